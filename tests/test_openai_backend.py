"""OpenAICompatBackend unit tests with respx standing in for an OpenAI-compatible server."""

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import respx

from app.backends import Completion
from app.backends.base import ChatInput, Upstream
from app.backends.openai_compat import OpenAICompatBackend
from app.errors import BackendError, BackendUnavailable, InvalidRequest, MiniVaultError, ModelNotFound
from app.schemas import GenerateRequest

pytestmark = pytest.mark.anyio


def as_chat(request: GenerateRequest, model: str) -> ChatInput:
    return ChatInput.single(model, request.prompt, request.system, request.upstream_options())


URL = "http://llm.test:8080"
UPSTREAM = Upstream("the OpenAI-compatible server", URL, "start it")


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def delta(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


FINISH = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}


@pytest.fixture
async def backend() -> AsyncIterator[OpenAICompatBackend]:
    async with httpx.AsyncClient(base_url=URL, headers={"Authorization": "Bearer sk-local"}) as client:
        yield OpenAICompatBackend(client, URL, "qwen", upstream=UPSTREAM)


async def collect(
    backend: OpenAICompatBackend, request: GenerateRequest, model: str = "qwen"
) -> tuple[str, Completion]:
    completion = Completion()
    return "".join([text async for text in backend.stream(as_chat(request, model), completion)]), completion


async def test_stream_reads_deltas_usage_and_finish_reason(backend: OpenAICompatBackend) -> None:
    with respx.mock(base_url=URL) as mock:
        route = mock.post("/v1/chat/completions").respond(
            200,
            content=b": keep-alive\n\n"
            + sse(
                {"choices": [{"delta": {"role": "assistant"}}]}, delta("Hi"), delta(" you"), FINISH, USAGE, b"[DONE]"
            ),  # fmt: skip
            headers={"content-type": "text/event-stream"},
        )
        text, completion = await collect(backend, GenerateRequest(prompt="hello", system="terse"))

    assert text == "Hi you"
    assert completion == Completion(done_reason="length", prompt_tokens=9, completion_tokens=2)
    sent = route.calls.last.request
    assert sent.headers["authorization"] == "Bearer sk-local"
    assert json.loads(sent.content) == {
        "model": "qwen",
        "messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_options_map_to_openai_fields(backend: OpenAICompatBackend) -> None:
    options = {"temperature": 0.1, "top_p": 0.5, "top_k": 20, "seed": 3, "stop": ["\n"], "num_predict": 16}
    with respx.mock(base_url=URL) as mock:
        route = mock.post("/v1/chat/completions").respond(200, content=sse(FINISH, b"[DONE]"))
        await collect(backend, GenerateRequest.model_validate({"prompt": "p", "options": options}))

    sent = json.loads(route.calls.last.request.content)
    assert {key: sent[key] for key in ("temperature", "top_p", "top_k", "seed", "stop", "max_tokens")} == {
        "temperature": 0.1, "top_p": 0.5, "top_k": 20, "seed": 3, "stop": ["\n"], "max_tokens": 16,
    }  # fmt: skip


async def test_load_time_options_are_accepted_named_and_not_sent(backend: OpenAICompatBackend) -> None:
    # aider's ollama_chat/ path sends options.num_ctx on every request: a 400 broke it entirely.
    with respx.mock(base_url=URL) as mock:
        route = mock.post("/v1/chat/completions").respond(200, content=sse(delta("ok"), FINISH, b"[DONE]"))
        options = {"num_ctx": 4096, "num_thread": 2, "temperature": 0.5}
        text, completion = await collect(backend, GenerateRequest.model_validate({"prompt": "p", "options": options}))

    sent = json.loads(route.calls.last.request.content)
    assert text == "ok"
    assert completion.ignored_options == ("num_ctx", "num_thread")
    assert sent["temperature"] == 0.5 and "num_ctx" not in sent and "num_thread" not in sent


async def broken_stream() -> AsyncIterator[bytes]:
    yield sse(delta("par"))
    raise httpx.ReadError("connection reset by peer")


@pytest.mark.parametrize(
    ("mocked", "error", "phrase"),
    [
        (httpx.Response(401, json={"error": {"message": "Invalid API Key", "type": "auth"}}), BackendError,
         "refused the credentials (401: Invalid API Key); set OPENAI_API_KEY"),
        (httpx.Response(500, json={"error": {"message": "CUDA out of memory"}}), BackendError,
         "answered 500: CUDA out of memory"),
        (httpx.Response(400, json={"error": {"message": "exceeds the context size"}}), InvalidRequest,
         "rejected the request: exceeds the context size"),
        (httpx.Response(200, content=sse(delta("a")) + b"data: {oops\n\n"), BackendError, "not JSON: b'{oops'"),
        (httpx.Response(200, content=sse(delta("a"), {"error": {"message": "slot crashed"}})), BackendError,
         "the OpenAI-compatible server: slot crashed"),
        (httpx.Response(200, content=sse(delta("a"))), BackendError, "closed the stream before it finished"),
        (httpx.Response(200, content=broken_stream()), BackendError, "broke: connection reset by peer"),
        (httpx.ConnectError("refused"), BackendUnavailable, f"cannot reach the OpenAI-compatible server at {URL}"),
    ],
)  # fmt: skip
async def test_failures_map_to_the_error_table(
    backend: OpenAICompatBackend, mocked: object, error: type[MiniVaultError], phrase: str
) -> None:
    with respx.mock(base_url=URL) as mock:
        route = mock.post("/v1/chat/completions")
        if isinstance(mocked, httpx.Response):
            route.mock(return_value=mocked)
        else:
            route.mock(side_effect=mocked)
        with pytest.raises(error) as raised:
            await collect(backend, GenerateRequest(prompt="hi"))

    assert phrase in raised.value.message


async def test_404_is_model_not_found_listing_served_models(backend: OpenAICompatBackend) -> None:
    with respx.mock(base_url=URL) as mock:
        mock.post("/v1/chat/completions").respond(404, json={"error": {"message": "model 'x' does not exist"}})
        mock.get("/v1/models").respond(200, json={"object": "list", "data": [{"id": "qwen"}, {"id": "phi"}]})
        with pytest.raises(ModelNotFound) as raised:
            await collect(backend, GenerateRequest(prompt="hi"), model="x")

    assert raised.value.message == (
        f"model 'x' is not served by the OpenAI-compatible server at {URL} (it serves: phi, qwen); "
        "name one of those, or set OPENAI_MODEL"
    )


async def test_probe_checks_the_model_list(backend: OpenAICompatBackend) -> None:
    with respx.mock(base_url=URL) as mock:
        models = mock.get("/v1/models")
        models.respond(200, json={"data": [{"id": "qwen"}]})
        present = await backend.probe(0.5)
        models.respond(200, json={"data": [{"id": "phi"}]})
        absent = await backend.probe(0.5)
        models.side_effect = httpx.ConnectError("refused")
        down = await backend.probe(0.5)

    assert (present.reachable, present.model_available) == (True, True)
    assert (absent.reachable, absent.model_available, absent.reason) == (
        True, False, "the OpenAI-compatible server does not list model 'qwen' (it lists: phi)"
    )  # fmt: skip
    assert down.reachable is False
