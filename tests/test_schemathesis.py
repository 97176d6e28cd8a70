"""Schemathesis against a live MiniVault and the fake Ollama: every documented operation, every check.

The schemathesis CLI runs in a subprocess exactly as one would by hand (`schemathesis run --checks all URL`),
once without API keys and once with a key passed as a Bearer header. A run fails on any failed check,
on any error, and on warnings that mean part of the schema went untested (an unresolvable `$ref` is only
a warning to schemathesis, and the operation behind it would otherwise pass while barely tested).
A failure prints the command and schemathesis' report, with a curl line per failing case; to rerun by hand,
serve MiniVault in front of `python -m tests.support.fake_ollama` and point the same command at it (with
`SCHEMATHESIS_HOOKS=tests/support/schemathesis_hooks.py`: the rules of a request no JSON schema states).
The fake's models can do everything (tools, thinking, vision, insert), so a schema-valid image, `think` or
`suffix` is answered rather than refused for the model, and the run must show that tools, tool results, images,
formats and thinking were generated, accepted and sent on by every dialect.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from tests.conftest import make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ROOT / "tests" / "support" / "schemathesis_hooks.py"
API_KEY = "test-key"
# Everything Ollama's models can do: a schema-valid image, `think` or `suffix` must reach the fake, not its 400.
EVERY_CAPABILITY = ["completion", "tools", "thinking", "vision", "insert", "embedding"]
# Warnings about the schema or the run itself, as opposed to statistics about the generated data.
FAIL_ON_WARNINGS = [
    "unresolvable_reference",
    "missing_deserializer",
    "unsupported_regex",
    "unused_openapi_auth",
    "missing_auth",
]
# Bounded: about 2-10 s per run on a 2-core machine. A fixed seed keeps CI reproducible; change it
# (or raise --max-examples) locally to explore further.
OPTIONS = [
    "--checks", "all",
    "--phases", "examples,coverage,fuzzing",
    "--max-examples", "50",
    "--seed", "1",
    "--workers", "1",
    "--request-timeout", "15",
    "--generation-database", "none",
    "--continue-on-failure",
    "--output-sanitize", "false",  # the key is a test key: print curl lines that reproduce as they are
    "--no-color",
    # Routes passed through to Ollama answer in Ollama's own terms; tests/test_ollama_api.py covers them.
    "--exclude-tag", "Ollama pass-through",
]  # fmt: skip


def run_schemathesis(
    server: RunningServer, tmp_path: Path, headers: list[str]
) -> tuple[subprocess.CompletedProcess[str], dict]:
    config = tmp_path / "schemathesis.toml"
    config.write_text(f"hooks = {json.dumps(str(HOOKS))}\n[warnings]\nfail-on = {json.dumps(FAIL_ON_WARNINGS)}\n")
    report = tmp_path / "schemathesis-report.json"
    header_args = [arg for header in headers for arg in ("--header", header)]
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
        "run", f"{server.url}/openapi.json", *OPTIONS, *header_args,
        "--report", "json", "--report-json-path", str(report),
    ]  # fmt: skip
    # Its own working directory, so nothing it writes lands in the repository; the hooks import MiniVault's own
    # checks, so the repository goes on its path.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=100, env=env)
    assert report.exists(), f"schemathesis wrote no report (exit {result.returncode}):\n{result.stdout}{result.stderr}"
    return result, json.loads(report.read_text())


def example_models(schema: dict[str, Any]) -> set[str]:
    """The models the request bodies' worked examples name (a vision model for an image, ...), as pulled (a
    name without a tag is `:latest`)."""
    return {
        example["model"] if ":" in example["model"] else f"{example['model']}:latest"
        for component in schema["components"]["schemas"].values()
        for example in component.get("examples", ())
        if isinstance(example, dict) and isinstance(example.get("model"), str)
    }


def features_sent(received: list[tuple[str, Any]]) -> dict[str, set[str]]:
    """Per upstream path, the new kinds of input that reached the fake Ollama."""
    sent: dict[str, set[str]] = {"/api/chat": set(), "/api/generate": set()}
    for path, body in received:
        if path not in sent or not isinstance(body, dict):
            continue
        seen = sent[path]
        seen.update(key for key in ("tools", "images", "suffix", "keep_alive") if body.get(key))
        if body.get("raw") is True:
            seen.add("raw")
        answer_format = body.get("format")
        if answer_format == "json" or isinstance(answer_format, dict):
            seen.add("format json" if answer_format == "json" else "format schema")
        if "think" in body:
            seen.add(f"think {body['think'] if isinstance(body['think'], str) else str(body['think']).lower()}")
        for message in body.get("messages") or ():
            seen.update(f"message {key}" for key in ("images", "tool_calls", "thinking") if message.get(key))
            if message.get("role") == "tool":
                seen.add("tool result")
    return sent


def features_answered(records: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Per endpoint, the new fields of the exchanges that were answered (status ok), as the log records them."""
    answered: dict[str, set[str]] = {}
    for record in records:
        if record["status"] == "ok":
            fields = ("tools", "format", "images", "thinking")
            answered.setdefault(record["endpoint"], set()).update(f for f in fields if record.get(f) is not None)
    return answered


@pytest.mark.parametrize("api_keys", [None, API_KEY], ids=["no-keys", "api-key"])
def test_schemathesis_finds_nothing(
    fake: FakeOllama, fake_server: RunningServer, log_path: Path, tmp_path: Path, api_keys: str | None
) -> None:
    fake.default_capabilities = list(EVERY_CAPABILITY)
    # An admin key: it reaches every operation, model management included (an ordinary key gets 403 there).
    overrides = {"admin_keys": api_keys} if api_keys else {}
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, **overrides)
    headers = [f"Authorization: Bearer {api_keys}"] if api_keys else []
    app = create_app(settings)
    # The examples' models too: schemathesis sends their names on with other generated fields.
    for model in example_models(app.openapi()):
        fake.add_model(model, EVERY_CAPABILITY)
    with serve_in_thread(app) as server:
        if api_keys:
            # The keyed run must really be keyed: without the header, a protected route refuses.
            assert httpx.get(f"{server.url}/models").status_code == 401
        result, report = run_schemathesis(server, tmp_path, headers)

    output = f"$ {' '.join(result.args)}\n{result.stdout}{result.stderr}"
    assert result.returncode == 0, output
    assert report["failures"] == [] and report["errors"] == [], output
    assert {name: ops for name, ops in report["warnings"].items() if ops and name in FAIL_ON_WARNINGS} == {}, output
    assert report["complete"], output
    operations = report["operations"]
    # Every operation but the pass-through ones (9 of them) is tested.
    assert operations["tested"] == operations["selected"] == operations["total"] - 9, output
    assert operations["tested"] >= 20 and operations["errored"] == 0, output
    # The new kinds of input were generated, accepted and sent on: every one reached the fake Ollama...
    sent = features_sent(fake.received)
    thinks = {"think true", "think false", "think low", "think medium", "think high"}
    assert sent["/api/chat"] == {"tools", "tool result", "message tool_calls", "message images", "message thinking",
                                 "format json", "format schema", "keep_alive", *thinks}  # fmt: skip
    assert sent["/api/generate"] == {"images", "suffix", "raw", "format json", "format schema", "keep_alive", *thinks}
    # ... and each dialect answered requests with them (MiniVault's own /generate has no tools).
    answered = features_answered(read_log(log_path))
    assert answered["openai"] == answered["ollama"] == {"tools", "format", "images", "thinking"}
    assert answered["rest"] | answered.get("sse", set()) == {"format", "images", "thinking"}
