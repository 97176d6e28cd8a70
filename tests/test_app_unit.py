"""The whole app in-process (lifespan included) with respx as Ollama: the error table and the log record."""

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import respx
from fastapi import FastAPI

from app.main import create_app
from tests.conftest import make_settings, read_log

pytestmark = pytest.mark.anyio
URL = "http://ollama.test:11434"


@asynccontextmanager
async def in_process(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client wired straight to the app; the lifespan runs around it, so the log is flushed on exit."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://minivault.test") as client:
            yield client


@pytest.fixture
def ollama() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=URL, assert_all_called=False) as mock:
        mock.get("/api/tags").respond(200, json={"models": [{"name": "tinyllama:1.1b-chat", "size": 637}]})
        yield mock


@pytest.mark.parametrize(
    ("upstream", "body", "status", "code"),
    [
        (None, {"prompt": ""}, 422, "invalid_request"),
        (
            httpx.Response(404, json={"error": "model 'x' not found"}),
            {"prompt": "hi", "model": "x"},
            404,
            "model_not_found",
        ),
        (httpx.ConnectError("refused"), {"prompt": "hi"}, 503, "backend_unavailable"),
        (httpx.ConnectTimeout("slow"), {"prompt": "hi"}, 504, "backend_timeout"),
        (httpx.ReadTimeout("slow"), {"prompt": "hi"}, 504, "backend_timeout"),
        (httpx.Response(503, json={"error": "server busy"}), {"prompt": "hi"}, 429, "busy"),
        (httpx.Response(500, json={"error": "llama runner crashed"}), {"prompt": "hi"}, 502, "backend_error"),
    ],
)
async def test_each_error_row_has_its_status_code_and_log_line(
    ollama: respx.MockRouter, log_path: Path, upstream: object, body: dict, status: int, code: str
) -> None:
    route = ollama.post("/api/generate")
    if isinstance(upstream, httpx.Response):
        route.mock(return_value=upstream)
    elif upstream is not None:
        route.mock(side_effect=upstream)
    app = create_app(make_settings(ollama_base_url=URL, log_path=log_path, upstream_transport="httpx"))
    async with in_process(app) as client:
        response = await client.post("/generate", json=body)

    assert response.status_code == status
    expected = {"code": code, "message": response.json()["error"]["message"], "id": response.headers["x-request-id"]}
    if code == "busy":
        expected["retry_after"] = 1
        assert response.headers["retry-after"] == "1"
    assert response.json() == {"error": expected}
    assert response.json()["error"]["message"]
    [line] = read_log(log_path)
    assert (line["status"], line["error"]["code"], line["id"]) == ("error", code, response.headers["x-request-id"])


async def test_log_record_has_every_documented_field(ollama: respx.MockRouter, log_path: Path) -> None:
    ollama.post("/api/generate").respond(
        200,
        content=b'{"response":"Hi","done":false}\n{"response":" there","done":false}\n'
        b'{"response":"","done":true,"done_reason":"stop","prompt_eval_count":4,"eval_count":2}\n',
    )
    app = create_app(make_settings(ollama_base_url=URL, log_path=log_path, upstream_transport="httpx"))
    async with in_process(app) as client:
        response = await client.post(
            "/generate",
            json={"prompt": "Say hi", "system": "Be kind", "options": {"temperature": 0.5}},
            headers={"X-Request-ID": "abc-123"},
        )

    assert response.status_code == 200
    [line] = read_log(log_path)
    assert set(line) == {
        "id", "ts", "endpoint", "client", "key_id", "conversation_id", "backend", "model", "prompt", "system",
        "options", "response", "prompt_chars", "response_chars", "status", "error", "done_reason", "prompt_tokens",
        "completion_tokens", "queue_ms", "ttft_ms", "latency_ms", "upstream", "tools", "format", "images",
        "tool_calls", "thinking", "thinking_chars", "ignored_options", "dropped_messages",
    }  # fmt: skip
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert {k: line[k] for k in line if k not in ("ts", "queue_ms", "ttft_ms", "latency_ms")} == {
        "id": "abc-123",
        "endpoint": "rest",
        "client": "192.0.2.7:50000",
        "key_id": None,
        "conversation_id": None,
        "backend": "ollama",
        "model": "tinyllama:1.1b-chat",
        "prompt": "Say hi",
        "system": "Be kind",
        "options": {"temperature": 0.5},
        "response": "Hi there",
        "prompt_chars": 6,
        "response_chars": 8,
        "status": "ok",
        "error": None,
        "done_reason": "stop",
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "upstream": None,  # named only with several hosts
        # Issue 16's fields: null for plain text (no tools offered, no format, no images, no calls, no thinking).
        "tools": None, "format": None, "images": None, "tool_calls": None, "thinking": None, "thinking_chars": None,
        "ignored_options": None, "dropped_messages": None,
    }  # fmt: skip
    # A free slot: the measured wait (about 0 ms), not null.
    assert 0 <= line["queue_ms"] <= line["ttft_ms"] <= line["latency_ms"]
    assert response.json()["usage"] == {"prompt_tokens": 4, "completion_tokens": 2}


async def test_openapi_documents_the_request_body(log_path: Path) -> None:
    async with in_process(
        create_app(make_settings(ollama_base_url=URL, log_path=log_path, upstream_transport="httpx"))
    ) as client:
        schema = (await client.get("/openapi.json")).json()
    reference = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert reference == {"$ref": "#/components/schemas/GenerateRequest"}
    body = schema["components"]["schemas"]["GenerateRequest"]
    assert body["properties"]["options"]["anyOf"][0] == {"$ref": "#/components/schemas/Options"}
    assert "num_predict" in schema["components"]["schemas"]["Options"]["properties"]
    assert body["required"] == ["prompt"]
    assert set(body["properties"]) == {
        "prompt",
        "model",
        "system",
        "options",
        "stream",
        "conversation_id",
        "format",
        "images",
        "think",
    }
    assert json.dumps(schema).count("invalid_request") >= 1
