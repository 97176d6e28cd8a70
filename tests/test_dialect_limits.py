"""The OpenAI- and Ollama-compatible routes under the same limits as /generate: a full queue, a queued
stream, the named timeouts and a client leaving mid-answer, each answered in the route's own dialect."""

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from tests.conftest import make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

pytestmark = pytest.mark.anyio

STEP = 10.0
OPENAI = "/v1/chat/completions"
OLLAMA = "/api/chat"


def body(path: str, model: str, stream: bool = True) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi there"}], "stream": stream}


@contextmanager
def gateway(fake_server: RunningServer, log_path: Path, **overrides: Any) -> Iterator[RunningServer]:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, **overrides)
    with serve_in_thread(create_app(settings)) as server:
        yield server


def error_of(path: str, response: httpx.Response) -> tuple[str, str]:
    """(code or "", message) from either dialect's error body."""
    error = response.json()["error"]
    if path == OLLAMA:
        assert isinstance(error, str)
        return "", error
    assert set(error) == {"message", "type", "code", "param"}
    return error["code"], error["message"]


def frames(path: str, lines: list[str]) -> list[dict[str, Any]]:
    """The JSON objects a stream carried: SSE `data:` frames (OpenAI) or NDJSON lines (Ollama)."""
    if path == OPENAI:
        data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        return [json.loads(item) for item in data if item != "[DONE]"]
    return [json.loads(line) for line in lines if line]


async def wait_queued(client: httpx.AsyncClient, count: int) -> None:
    """Poll the queue gauge: a request says nothing while it waits."""
    deadline = time.monotonic() + STEP
    while f"\nminivault_queued {count:.1f}\n" not in (await client.get("/metrics")).text:
        assert time.monotonic() < deadline, f"the queue never held {count}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("path", [OPENAI, OLLAMA])
async def test_full_queue_is_429_with_retry_after_in_the_dialect(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, path: str
) -> None:
    with gateway(fake_server, log_path, max_concurrency=1, max_queue=0) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as client:
            holder = await client.send(client.build_request("POST", path, json=body(path, "slow")), stream=True)
            try:
                # A token: the one slot is taken. The iterator is kept: dropping it would close the response.
                lines = holder.aiter_lines()
                await asyncio.wait_for(anext(lines), STEP)
                response = await client.post(path, json=body(path, "tinyllama:1.1b-chat", stream=False))
            finally:
                await holder.aclose()

    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    code, message = error_of(path, response)
    assert code == ("busy" if path == OPENAI else "")
    assert "MINIVAULT_MAX_QUEUE=0" in message
    if path == OPENAI:
        assert response.json()["error"]["type"] == "rate_limit_error"
    lines = read_log(log_path)
    endpoint = "openai" if path == OPENAI else "ollama"
    busy = [line for line in lines if line["status"] == "error"]
    assert [(line["endpoint"], line["error"]["code"]) for line in busy] == [(endpoint, "busy")]


@pytest.mark.parametrize("path", [OPENAI, OLLAMA])
async def test_a_queued_stream_carries_no_queue_frames_and_answers_once_admitted(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, path: str
) -> None:
    with gateway(fake_server, log_path, max_concurrency=1, max_queue=1) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as client:
            holder = await client.send(client.build_request("POST", path, json=body(path, "slow")), stream=True)
            lines = holder.aiter_lines()  # kept: dropping it would close the response
            await asyncio.wait_for(anext(lines), STEP)
            queued = asyncio.create_task(client.post(path, json=body(path, "tinyllama:1.1b-chat")))
            await wait_queued(client, 1)
            assert not queued.done()
            await holder.aclose()  # frees the slot
            response = await asyncio.wait_for(queued, STEP)

    assert response.status_code == 200
    objects = frames(path, response.text.splitlines())
    text = "".join(
        (o["choices"][0]["delta"].get("content") or "") if path == OPENAI else o["message"]["content"]
        for o in objects
        if o.get("choices") or path == OLLAMA
    )
    assert text == "hi there"
    assert all("position" not in o and o.get("type") != "queued" for o in objects)
    answered = [line for line in read_log(log_path) if line["status"] == "ok"]
    assert len(answered) == 1 and answered[0]["queue_ms"] is not None and answered[0]["queue_ms"] > 0


@pytest.mark.parametrize("path", [OPENAI, OLLAMA])
async def test_first_token_timeout_is_504_naming_its_setting(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, path: str
) -> None:
    with gateway(fake_server, log_path, first_token_timeout=0.5, idle_timeout=5.0) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as client:
            response = await client.post(path, json=body(path, "hang"))
        await asyncio.to_thread(fake.wait_until, lambda f: f.disconnects == 1, 1.0)

    assert response.status_code == 504
    code, message = error_of(path, response)
    assert code == ("backend_timeout" if path == OPENAI else "")
    assert "MINIVAULT_FIRST_TOKEN_TIMEOUT=0.5" in message
    [line] = read_log(log_path)
    assert (line["status"], line["error"]["code"]) == ("error", "backend_timeout")


@pytest.mark.parametrize("path", [OPENAI, OLLAMA])
async def test_idle_timeout_mid_stream_ends_it_with_an_error_frame(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, path: str
) -> None:
    with gateway(fake_server, log_path, first_token_timeout=5.0, idle_timeout=0.5) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as client:
            response = await client.post(path, json=body(path, "stall"))

    assert response.status_code == 200
    *tokens, last = frames(path, response.text.splitlines())
    assert len(tokens) == 2
    error = last["error"]
    message = error if path == OLLAMA else error["message"]
    assert "MINIVAULT_IDLE_TIMEOUT=0.5" in message
    if path == OPENAI:
        assert (error["code"], error["type"]) == ("backend_timeout", "server_error")
        assert "data: [DONE]" not in response.text
    [line] = read_log(log_path)
    assert (line["status"], line["response"]) == ("error", "s0 s1 ")


@pytest.mark.parametrize("path", [OPENAI, OLLAMA])
async def test_client_leaving_mid_stream_closes_the_upstream_and_logs_cancelled(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, path: str
) -> None:
    with gateway(fake_server, log_path) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=STEP) as client:
            stream = await client.send(client.build_request("POST", path, json=body(path, "slow")), stream=True)
            first = await asyncio.wait_for(anext(stream.aiter_lines()), STEP)
            await stream.aclose()
        await asyncio.to_thread(fake.wait_until, lambda f: f.disconnects == 1, 1.0)

    assert "w0 " in first
    assert fake.finished == 0
    [line] = read_log(log_path)
    endpoint = "openai" if path == OPENAI else "ollama"
    assert (line["endpoint"], line["status"], line["done_reason"]) == (endpoint, "cancelled", "cancelled")
