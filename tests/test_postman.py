"""The Postman collection, run for real by newman against a live MiniVault and the fake Ollama."""

import json
import subprocess
from pathlib import Path

import pytest

from app.main import create_app
from tests.conftest import closed_port_url, make_settings
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
NEWMAN = ROOT / "node_modules" / ".bin" / "newman"
# The collection's default models for tools, thinking and images, with what they can do in Ollama.
CAPABLE_MODELS = {"qwen3:0.6b": ["completion", "tools", "thinking"], "llava:7b": ["completion", "vision"]}


@pytest.fixture
def fake() -> FakeOllama:
    """The fake Ollama of every test here, with the collection's models."""
    fake = FakeOllama()
    for name, capabilities in CAPABLE_MODELS.items():
        fake.add_model(name, capabilities)
    return fake


def run_newman(base_url: str, report: Path, api_key: str = "") -> tuple[int, dict]:
    assert NEWMAN.exists(), "newman is missing: `npm ci` (make test does it)"
    result = subprocess.run(
        [str(NEWMAN), "run", "postman_collection.json", "--env-var", f"baseUrl={base_url}",
         "--env-var", f"apiKey={api_key}",
         "--reporters", "cli,json", "--reporter-json-export", str(report), "--timeout-request", "30000"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return result.returncode, json.loads(report.read_text())["run"]


# Issue 16's requests: tools, a tool result, structured output and thinking answered, and bad images refused.
NEW_SHAPES = {"Generate (format: JSON schema)", "Chat completion with tools (tool_calls)",
              "Chat completion with a tool result", "Chat completion (response_format: json_schema)",
              "Ollama chat (think: true)", "Ollama chat (format: JSON schema)"}  # fmt: skip
NEW_REFUSALS = {"Image URL over http (refused)", "Ollama image that is not an image"}


def test_collection_passes_against_a_live_minivault(fake: FakeOllama, minivault: RunningServer, tmp_path: Path) -> None:
    code, run = run_newman(minivault.url, tmp_path / "report.json")

    assert run["failures"] == []
    assert code == 0
    assert run["stats"]["requests"] == {"total": 56, "pending": 0, "failed": 0}
    assert run["stats"]["assertions"] == {"total": 167, "pending": 0, "failed": 0}
    names = {execution["item"]["name"] for execution in run["executions"]}
    assert {"Generate (JSON)", "Generate (stream: Server-Sent Events)", "Health", "Ready", "Models", "Metrics",
            "Pull a model (Ollama backend)", "Blank prompt", "Unknown model", "Bad JSON",
            "No API key", "Create a conversation", "Second prompt sees the first", "Read the conversation",
            "Read the conversation a page at a time", "Next page of turns",
            "Forget the conversation", "Forgotten conversation", "History, newest first", "History search",
            "One exchange", "History stats", "Chat completion (JSON)", "Chat completion (stream: chunks)",
            "Text completion", "List models (OpenAI)", "Retrieve a model", "Retrieve an unknown model",
            "Refused field (n: 2)", "Ollama generate (stream: false)", "Ollama chat (stream: false)",
            "Ollama chat (stream: NDJSON)", "Ollama tags", "Ollama show", "Ollama version", "Ollama ps",
            "Ollama unknown model", "Ollama bad request", "Playground", "Swagger UI (no CDN)",
            "Swagger UI bundle", *NEW_SHAPES, *NEW_REFUSALS} <= names  # fmt: skip
    # The tool result's turn sent the call back as the answer before gave it: its id, its arguments byte for byte.
    answers = {execution["item"]["name"]: bytes(execution["response"]["stream"]["data"])
               for execution in run["executions"]}  # fmt: skip
    call = json.loads(answers["Chat completion with tools (tool_calls)"])["choices"][0]["message"]["tool_calls"][0]
    turns = [body for path, body in fake.raw_requests if path == "/api/chat" and b'"role":"tool"' in body]
    assert len(turns) == 1
    assert f'"arguments":{call["function"]["arguments"]}'.encode() in turns[0]
    assert json.loads(turns[0])["messages"][1]["tool_calls"][0]["id"] == call["id"]


def test_collection_passes_against_a_minivault_with_api_keys(
    fake_server: RunningServer, log_path: Path, tmp_path: Path
) -> None:
    # An admin key: the collection pulls a model, which an ordinary key may not (403).
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, admin_keys="postman-key")
    with serve_in_thread(create_app(settings)) as server:
        code, run = run_newman(server.url, tmp_path / "report.json", api_key="postman-key")

    assert run["failures"] == []
    assert code == 0
    assertions = {
        assertion["assertion"]
        for execution in run["executions"]
        if execution["item"]["name"] == "No API key"
        for assertion in execution.get("assertions", [])
    }
    assert assertions == {"status is 401", "code is unauthorized, message names the headers",
                          "WWW-Authenticate says Bearer"}  # fmt: skip


def test_collection_fails_when_the_backend_is_down(log_path: Path, tmp_path: Path) -> None:
    # The assertions must be able to fail: with Ollama stopped, generation and readiness do, in every dialect;
    # refusals of bad requests and the pages need no backend. No retries: each one only adds backoff here.
    settings = make_settings(ollama_base_url=closed_port_url(), log_path=log_path, upstream_retries=0)
    with serve_in_thread(create_app(settings)) as server:
        code, run = run_newman(server.url, tmp_path / "report.json")

    assert code == 1
    failed = {failure["source"]["name"] for failure in run["failures"]}
    assert {"Generate (JSON)", "Ready", "Health", "Models", "Unknown model", "Chat completion (JSON)",
            "Retrieve an unknown model", "Ollama generate (stream: false)", "Ollama tags",
            *NEW_SHAPES} <= failed  # fmt: skip
    assert not {"Blank prompt", "Bad JSON", "Refused field (n: 2)", "Ollama bad request", "Playground",
                "Swagger UI (no CDN)", "Swagger UI bundle", *NEW_REFUSALS} & failed  # fmt: skip
