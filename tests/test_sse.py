"""POST /generate with `stream: true`: Server-Sent Events read incrementally by httpx."""

from pathlib import Path

import httpx
import pytest

from tests.conftest import read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer
from tests.support.sse import aparse_events, parse_events

pytestmark = pytest.mark.anyio


def test_stream_sends_tokens_then_done(minivault: RunningServer, log_path: Path) -> None:
    with httpx.stream("POST", f"{minivault.url}/generate", json={"prompt": "a b c d", "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        events = list(parse_events(response.iter_lines()))

    names = [name for name, _ in events]
    assert names == ["token"] * 4 + ["done"]
    assert [data["content"] for _, data in events[:-1]] == ["a ", "b ", "c ", "d"]
    done = events[-1][1]
    assert done["response"] == "a b c d"
    assert done["id"] == response.headers["x-request-id"]
    assert done["usage"] == {"prompt_tokens": 4, "completion_tokens": 4}
    assert done["timings"]["ttft_ms"] > 0
    minivault.stop()
    [line] = read_log(log_path)
    assert (line["endpoint"], line["status"], line["response"]) == ("sse", "ok", "a b c d")


async def test_tokens_arrive_before_the_upstream_finishes(minivault: RunningServer, fake: FakeOllama) -> None:
    body = {"prompt": "x", "model": "slow", "stream": True, "options": {"num_predict": 25}}
    async with httpx.AsyncClient() as client, client.stream("POST", f"{minivault.url}/generate", json=body) as response:
        events = aparse_events(response)
        name, first = await anext(events)
        assert (name, first) == ("token", {"content": "w0 "})
        # The fake takes 20 ms per token: at the first token it is still generating.
        assert fake.finished == 0
        rest = [event async for event in events]
    assert [name for name, _ in rest] == ["token"] * 24 + ["done"]
    assert fake.finished == 1


def test_error_after_tokens_is_an_error_event(minivault: RunningServer, log_path: Path) -> None:
    body = {"prompt": "one two three", "model": "error-line", "stream": True}
    with httpx.stream("POST", f"{minivault.url}/generate", json=body) as response:
        assert response.status_code == 200
        events = list(parse_events(response.iter_lines()))

    assert [name for name, _ in events] == ["token", "token", "error"]
    error = events[-1][1]["error"]
    assert error["code"] == "backend_error"
    assert "GGML_ASSERT" in error["message"]
    assert error["id"] == response.headers["x-request-id"]
    minivault.stop()
    [line] = read_log(log_path)
    assert (line["status"], line["response"], line["error"]["code"]) == ("error", "one two ", "backend_error")


def test_error_before_the_first_token_keeps_its_http_status(minivault: RunningServer) -> None:
    response = httpx.post(f"{minivault.url}/generate", json={"prompt": "hi", "model": "absent", "stream": True})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


async def test_client_disconnect_closes_the_upstream_request(
    minivault: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    body = {"prompt": "x", "model": "slow", "stream": True}
    async with httpx.AsyncClient() as client, client.stream("POST", f"{minivault.url}/generate", json=body) as response:
        events = aparse_events(response)
        assert (await anext(events))[0] == "token"
        assert (await anext(events))[0] == "token"
    # Leaving the block closed the connection: MiniVault must hang up on Ollama too.
    fake.wait_until(lambda f: f.disconnects == 1)
    assert fake.finished == 0
    minivault.stop()
    [line] = read_log(log_path)
    assert line["status"] == "cancelled"
    assert line["done_reason"] == "cancelled"
    assert line["response"].startswith("w0 w1 ")
