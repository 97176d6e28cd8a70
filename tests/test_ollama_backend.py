"""OllamaBackend unit tests with respx standing in for Ollama at the HTTP boundary."""

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from app.backends import Completion, OllamaBackend
from app.backends.base import ChatInput, iter_json_lines
from app.errors import BackendError, BackendTimeout, BackendUnavailable, InvalidRequest, MiniVaultError, ModelNotFound
from app.schemas import GenerateRequest

pytestmark = pytest.mark.anyio


def as_chat(request: GenerateRequest, model: str) -> ChatInput:
    return ChatInput.single(model, request.prompt, request.system, request.upstream_options())


URL = "http://ollama.test:11434"


def ndjson(*events: dict) -> bytes:
    return b"".join(json.dumps(event).encode() + b"\n" for event in events)


DONE = {"done": True, "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 2, "response": ""}


async def collect(backend: OllamaBackend, request: GenerateRequest, model: str = "m") -> tuple[list[str], Completion]:
    completion = Completion()
    return [text async for text in backend.stream(as_chat(request, model), completion)], completion


@pytest.fixture
async def backend() -> AsyncIterator[OllamaBackend]:
    timeout = httpx.Timeout(connect=1.5, read=7.0, write=7.0, pool=7.0)
    async with httpx.AsyncClient(base_url=URL, timeout=timeout) as client:
        yield OllamaBackend(client, URL, "m")


async def test_stream_parses_tokens_and_final_stats(backend: OllamaBackend) -> None:
    with respx.mock(base_url=URL) as mock:
        route = mock.post("/api/generate").respond(
            200, content=ndjson({"response": "Hel", "done": False}, {"response": "lo", "done": False}, DONE)
        )
        texts, completion = await collect(backend, GenerateRequest(prompt="hi"))

    assert texts == ["Hel", "lo"]
    assert completion == Completion(done_reason="stop", prompt_tokens=3, completion_tokens=2)
    assert json.loads(route.calls.last.request.content) == {"model": "m", "prompt": "hi", "stream": True}


async def test_system_and_options_are_sent_as_given(backend: OllamaBackend) -> None:
    request = GenerateRequest.model_validate(
        {"prompt": "p", "system": "s", "options": {"temperature": 0, "num_predict": 8, "stop": ["###"], "seed": 1}}
    )
    with respx.mock(base_url=URL) as mock:
        route = mock.post("/api/generate").respond(200, content=ndjson(DONE))
        await collect(backend, request, model="llama3:8b")

    assert json.loads(route.calls.last.request.content) == {
        "model": "llama3:8b",
        "prompt": "p",
        "stream": True,
        "system": "s",
        "options": {"temperature": 0.0, "num_predict": 8, "stop": ["###"], "seed": 1},
    }


@pytest.mark.parametrize(
    ("mocked", "error", "phrase"),
    [
        (httpx.ConnectError("refused"), BackendUnavailable, f"cannot reach Ollama at {URL}"),
        (
            httpx.ConnectTimeout("slow"),
            BackendTimeout,
            "within 1.5 s (connect timeout; raise MINIVAULT_CONNECT_TIMEOUT)",
        ),
        (httpx.ReadTimeout("slow"), BackendTimeout, "nothing for 7.0 s (raise MINIVAULT_FIRST_TOKEN_TIMEOUT"),
        (httpx.PoolTimeout("busy"), BackendTimeout, "MINIVAULT_UPSTREAM_MAX_CONNECTIONS"),
        (httpx.RemoteProtocolError("peer closed"), BackendError, "broke: peer closed"),
        (httpx.Response(500, json={"error": "out of memory"}), BackendError, "Ollama answered 500: out of memory"),
        (httpx.Response(400, text="bad things"), InvalidRequest, "Ollama rejected the request: bad things"),
        (httpx.Response(200, content=ndjson({"response": "a"}, {"error": "boom"})), BackendError, "Ollama: boom"),
        (httpx.Response(200, content=ndjson({"response": "a"})), BackendError, "before its final 'done' line"),
        (httpx.Response(200, content=b'{"response": "a"}\nnot json\n'), BackendError, "not JSON: b'not json'"),
        (httpx.Response(200, content=b"[1, 2]\n"), BackendError, "not a JSON object"),
    ],
)
async def test_failures_map_to_the_error_table(
    backend: OllamaBackend, mocked: object, error: type[MiniVaultError], phrase: str
) -> None:
    with respx.mock(base_url=URL) as mock:
        route = mock.post("/api/generate")
        if isinstance(mocked, httpx.Response):
            route.mock(return_value=mocked)
        else:
            route.mock(side_effect=mocked)
        with pytest.raises(error) as raised:
            await collect(backend, GenerateRequest(prompt="hi"))

    assert phrase in raised.value.message
    assert raised.value.status == error.status


async def test_missing_model_lists_installed_models(backend: OllamaBackend) -> None:
    with respx.mock(base_url=URL) as mock:
        mock.post("/api/generate").respond(404, json={"error": "model 'nope' not found, try pulling it first"})
        mock.get("/api/tags").respond(200, json={"models": [{"name": "b:1"}, {"name": "a:latest"}]})
        with pytest.raises(ModelNotFound) as raised:
            await collect(backend, GenerateRequest(prompt="hi"), model="nope")

    assert raised.value.status == 404
    assert raised.value.message == (
        "model 'nope' is not installed in Ollama (installed: a:latest, b:1); pull it with `ollama pull nope`"
    )


async def test_probe_reports_reachability_and_the_model(backend: OllamaBackend) -> None:
    with respx.mock(base_url=URL) as mock:
        tags = mock.get("/api/tags")
        tags.respond(200, json={"models": [{"name": "m:latest"}]})
        present = await backend.probe(0.5)
        tags.respond(200, json={"models": [{"name": "other:1"}]})
        absent = await backend.probe(0.5)
        tags.side_effect = httpx.ConnectError("refused")
        down = await backend.probe(0.5)

    assert (present.reachable, present.model_available) == (True, True)
    assert (absent.reachable, absent.model_available) == (True, False)
    assert "ollama pull m" in (absent.reason or "")
    assert (down.reachable, down.model_available) == (False, False)
    assert URL in (down.reason or "")


async def aiter(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_ndjson_lines_split_at_every_byte_boundary() -> None:
    events = [{"response": "héllo 👋🏽"}, {"response": "世界"}, {"done": True}]
    body = ndjson(*events)
    for cut in range(1, len(body)):
        parsed = [event async for event in iter_json_lines(aiter([body[:cut], body[cut:]]), "Ollama")]
        assert parsed == events, cut
    one_byte_chunks = [body[i : i + 1] for i in range(len(body))]
    assert [event async for event in iter_json_lines(aiter(one_byte_chunks), "Ollama")] == events


async def test_ndjson_final_line_without_newline_and_blank_lines() -> None:
    chunks = [b'\n{"a": 1}\n\n', b'{"b": 2}']
    assert [event async for event in iter_json_lines(aiter(chunks), "Ollama")] == [{"a": 1}, {"b": 2}]
