"""The API's own documentation: a worked example for every operation, and /docs and /redoc that load
everything they need from MiniVault itself (the browser side is in tests/test_page.py)."""

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import orjson

from app.main import create_app
from tests.conftest import make_settings
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

Shape = Callable[[dict[str, Any]], bool]


def _messages(example: dict[str, Any]) -> list[dict[str, Any]]:
    return example.get("messages") or []


def _a_tool_turn(example: dict[str, Any]) -> bool:
    """An assistant's earlier calls and a tool's result: the agent loop's next turn."""
    roles = {m["role"] for m in _messages(example) if m["role"] == "tool" or m.get("tool_calls")}
    return roles == {"assistant", "tool"}


def _has(field: str) -> Shape:
    return lambda example: example.get(field) not in (None, False, "", [])


# Each new shape a request body takes, as a worked example of its own (a body may show several).
REQUEST_SHAPES: dict[str, dict[str, Shape]] = {
    "ChatCompletionRequest": {
        "tools": _has("tools"),
        "a named tool_choice": lambda e: isinstance(e.get("tool_choice"), dict),
        "a tool result": _a_tool_turn,
        "an image": lambda e: any(
            isinstance(m["content"], list) and any(p["type"] == "image_url" for p in m["content"]) for m in _messages(e)
        ),
        "response_format json_object": lambda e: (e.get("response_format") or {}).get("type") == "json_object",
        "response_format json_schema": lambda e: (e.get("response_format") or {}).get("type") == "json_schema",
        "reasoning_effort": _has("reasoning_effort"),
    },
    "CompletionRequest": {"suffix": _has("suffix")},
    "ChatBody": {
        "tools": _has("tools"),
        "a tool result": _a_tool_turn,
        "an image": lambda e: any(m.get("images") for m in _messages(e)),
        "format": _has("format"),
        "think": _has("think"),
        "keep_alive": _has("keep_alive"),
    },
    "GenerateBody": {
        "suffix": _has("suffix"),
        "suffix with raw": lambda e: bool(e.get("suffix") and e.get("raw")),
        "an image": _has("images"),
        "format": _has("format"),
        "think": _has("think"),
    },
    "GenerateRequest": {"format": _has("format"), "an image": _has("images"), "think": _has("think")},
}
# What the examples' models can do, as in Ollama: each example must suit its model (an image for a vision model).
EXAMPLE_MODELS = {
    "tinyllama:1.1b-chat": ["completion", "tools"],
    "llama3.1:latest": ["completion", "tools"],
    "llava:7b": ["completion", "vision"],
    "qwen3:0.6b": ["completion", "tools", "thinking"],
    "qwen3:8b": ["completion", "tools", "thinking"],
    "qwen2.5-coder:1.5b": ["completion", "tools", "insert"],
}


def has_example(node: Any, components: dict[str, Any], depth: int = 0) -> bool:
    """An `example`/`examples` anywhere under `node`, following `$ref`s into the components."""
    if depth > 8:
        return False
    if isinstance(node, dict):
        if "example" in node or "examples" in node:
            return True
        if "$ref" in node:
            return has_example(components[node["$ref"].rsplit("/", 1)[-1]], components, depth + 1)
        return any(has_example(value, components, depth + 1) for value in node.values())
    if isinstance(node, list):
        return any(has_example(value, components, depth + 1) for value in node)
    return False


def test_every_operation_has_a_worked_example(log_path: Path) -> None:
    schema = create_app(make_settings(log_path=log_path)).openapi()
    components = schema["components"]["schemas"]
    missing = []
    operations = 0
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            operations += 1
            answers = {
                code: r for code, r in operation["responses"].items() if code.startswith("2") or code == "default"
            }
            parts = (operation.get("requestBody"), operation.get("parameters"), answers)
            if not any(has_example(part, components) for part in parts):
                missing.append(f"{method.upper()} {path}")

    assert missing == []
    assert operations >= 32
    assert "WS /ws/generate" in schema["info"]["description"]


def test_docs_and_redoc_load_their_assets_from_minivault_only(log_path: Path) -> None:
    with serve_in_thread(create_app(make_settings(log_path=log_path))) as server:
        pages = {path: httpx.get(f"{server.url}{path}") for path in ("/docs", "/redoc")}
        urls = {path: re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
                for path, page in pages.items()}  # fmt: skip
        assets = {
            url: httpx.get(f"{server.url}{url}") for found in urls.values() for url in found if url != "/openapi.json"
        }

    assert all(page.status_code == 200 for page in pages.values())
    assert not re.search(r"https?://", pages["/docs"].text + pages["/redoc"].text)
    assert set(assets) == {
        "/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/docs-assets/favicon.png",
        "/docs-assets/redoc.standalone.js",
    }  # fmt: skip
    assert all(response.status_code == 200 and len(response.content) > 1000 for response in assets.values())
    assert "SwaggerUIBundle" in assets["/docs-assets/swagger-ui-bundle.js"].text


def request_bodies(schema: dict[str, Any]) -> dict[str, str]:
    """Path -> the component its POST body is, for the operations that generate."""
    bodies = {}
    for path in ("/generate", "/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"):
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        bodies[path] = ref.rsplit("/", 1)[-1]
    return bodies


def answer_examples(operation: dict[str, Any], media_type: str) -> list[Any]:
    """The values a 200's examples show for one media type."""
    content = operation["responses"]["200"]["content"].get(media_type, {})
    values = [example["value"] for example in content.get("examples", {}).values()]
    return values + ([content["example"]] if "example" in content else [])


def test_each_new_shape_has_a_worked_request_example(log_path: Path) -> None:
    schema = create_app(make_settings(log_path=log_path)).openapi()
    components = schema["components"]["schemas"]

    assert set(request_bodies(schema).values()) == set(REQUEST_SHAPES)
    missing = {
        f"{body}: {shape}"
        for body, shapes in REQUEST_SHAPES.items()
        for shape, test in shapes.items()
        if not any(test(example) for example in components[body]["examples"])
    }
    assert missing == set()


def test_answers_have_worked_examples_with_tool_calls_and_thinking(log_path: Path) -> None:
    paths = create_app(make_settings(log_path=log_path)).openapi()["paths"]
    openai, chat, generate = (paths[path]["post"] for path in ("/v1/chat/completions", "/api/chat", "/api/generate"))

    messages = [answer["choices"][0]["message"] for answer in answer_examples(openai, "application/json")]
    assert any(m.get("tool_calls") for m in messages) and any(m.get("reasoning_content") for m in messages)
    assert any('"tool_calls"' in text for text in answer_examples(openai, "text/event-stream"))
    messages = [answer["message"] for answer in answer_examples(chat, "application/json")]
    assert any(m.get("tool_calls") for m in messages) and any(m.get("thinking") for m in messages)
    lines = "".join(answer_examples(chat, "application/x-ndjson"))
    assert '"tool_calls"' in lines and '"thinking"' in lines
    assert any(answer.get("thinking") for answer in answer_examples(generate, "application/json"))
    assert '"thinking"' in "".join(answer_examples(generate, "application/x-ndjson"))


def test_every_request_example_is_valid_and_answered(
    fake: FakeOllama, fake_server: RunningServer, log_path: Path
) -> None:
    for name, capabilities in EXAMPLE_MODELS.items():
        fake.add_model(name, capabilities)
    app = create_app(make_settings(ollama_base_url=fake_server.url, log_path=log_path))
    schema = app.openapi()
    bodies = request_bodies(schema)
    invalid, refused = [], []
    with serve_in_thread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for path, body in bodies.items():
            # The body's own schema, its `$ref`s resolved in the document's components.
            validator = jsonschema_rs.Draft202012Validator(
                {"$ref": f"#/components/schemas/{body}", "components": schema["components"]}
            )
            for index, example in enumerate(schema["components"]["schemas"][body]["examples"]):
                invalid += [f"{body}[{index}]: {error.message}" for error in validator.iter_errors(example)]
                answer = client.post(path, content=orjson.dumps(example), headers={"Content-Type": "application/json"})
                # A stream's failure comes in-band, after its 200: no frame or line may hold an error.
                if answer.status_code != 200 or b'"error"' in answer.content:
                    refused.append(f"POST {path} {body}[{index}]: {answer.status_code} {answer.text[:200]}")

    assert invalid == []
    assert refused == []
    # Every example was sent: 5 bodies, each with a plain one and more.
    examples = sum(len(schema["components"]["schemas"][body]["examples"]) for body in bodies.values())
    assert examples >= 30 and len(fake.requests) >= examples
