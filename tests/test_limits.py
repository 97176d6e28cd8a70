"""Admission (queue, 429 busy), named timeouts, Ollama busy, disconnects, connection retries and warm-up,
against a real MiniVault and the fake Ollama over loopback."""

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from app.backends.transport import RetryConnect
from app.main import create_app
from tests.conftest import make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import FakeOllamaProcess, RunningServer, poll_ready, serve_in_thread
from tests.support.sse import aparse_events, parse_events

pytestmark = pytest.mark.anyio

STEP = 10.0  # generous bound on any single step that should take milliseconds


@contextmanager
def gateway(fake_server: RunningServer, log_path: Path, **overrides: Any) -> Iterator[RunningServer]:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, **overrides)
    with serve_in_thread(create_app(settings)) as server:
        yield server


async def until(fake: FakeOllama, predicate: Callable[[FakeOllama], bool], within: float = STEP) -> None:
    """fake.wait_until off the event loop, so the test's own sockets keep closing meanwhile."""
    await asyncio.to_thread(fake.wait_until, predicate, within)


class SseStream:
    """One `stream: true` request whose events are read one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.events = aparse_events(response)

    @classmethod
    async def open(cls, client: httpx.AsyncClient, url: str, prompt: str, model: str | None = None) -> "SseStream":
        body: dict[str, Any] = {"prompt": prompt, "stream": True}
        if model is not None:
            body["model"] = model
        return cls(await client.send(client.build_request("POST", f"{url}/generate", json=body), stream=True))

    async def next(self) -> tuple[str, Any]:
        return await asyncio.wait_for(anext(self.events), STEP)

    async def rest(self) -> list[tuple[str, Any]]:
        return await asyncio.wait_for(_collect(self.events), STEP)

    async def close(self) -> None:
        await self.response.aclose()


async def _collect(events: AsyncIterator[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [event async for event in events]


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(decode=True), STEP))


async def frames_until_end(ws: ClientConnection) -> list[dict[str, Any]]:
    frames = [await recv(ws)]
    while frames[-1]["type"] not in ("done", "error"):
        frames.append(await recv(ws))
    return frames


def raw_post(server: RunningServer, body: bytes) -> socket.socket:
    """A REST request on a bare socket, so the test decides exactly when the connection goes away."""
    conn = socket.create_connection((server.host, server.port))
    conn.sendall(
        b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    return conn


async def wait_queued(client: httpx.AsyncClient, server: RunningServer, count: int) -> None:
    """Poll the queue gauge: a REST request says nothing while it waits."""
    deadline = time.monotonic() + STEP
    while f"\nminivault_queued {count:.1f}\n" not in (await client.get(f"{server.url}/metrics")).text:
        assert time.monotonic() < deadline, f"the queue never held {count}"
        await asyncio.sleep(0.02)


def by_prompt(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["prompt"]: line for line in lines}


# --- admission: 429, FIFO, queued events -----------------------------------------------------------------


async def test_full_queue_refuses_the_surplus_at_once_with_retry_after(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    with gateway(fake_server, log_path, max_concurrency=2, max_queue=3) as server:
        async with httpx.AsyncClient(timeout=STEP) as client:
            streams = await asyncio.gather(*(SseStream.open(client, server.url, f"p{i}", "slow") for i in range(8)))
            try:
                accepted = [s for s in streams if s.response.status_code == 200]
                refused = [s.response for s in streams if s.response.status_code == 429]
                assert (len(accepted), len(refused)) == (5, 3)
                # "slow" takes 8 s: every refusal came while all the accepted answers were still running.
                assert (fake.started, fake.finished) == (2, 0)
                refused_ids = set()
                for response in refused:
                    await response.aread()
                    retry_after = int(response.headers["retry-after"])
                    assert retry_after >= 1
                    error = response.json()["error"]
                    assert error["code"] == "busy"
                    assert error["retry_after"] == retry_after
                    assert "MINIVAULT_MAX_CONCURRENCY=2, MINIVAULT_MAX_QUEUE=3" in error["message"]
                    refused_ids.add(error["id"])
                firsts = [await stream.next() for stream in accepted]
                assert sorted(data["position"] for name, data in firsts if name == "queued") == [1, 2, 3]
                assert [data for name, data in firsts if name == "token"] == [{"content": "w0 "}] * 2
                # Queued ones leave first, and are gone before a running one leaves and frees its slot.
                running = [stream for stream, (name, _) in zip(accepted, firsts, strict=True) if name == "token"]
                for stream in streams:
                    if stream not in running:
                        await stream.close()
                await wait_queued(client, server, 0)
            finally:
                for stream in streams:
                    await stream.close()
        await until(fake, lambda f: f.disconnects == 2)

    lines = read_log(log_path)
    busy = [line for line in lines if line["status"] == "error"]
    assert {line["id"] for line in busy} == refused_ids
    assert {(line["endpoint"], line["error"]["code"], line["queue_ms"]) for line in busy} == {("sse", "busy", None)}
    assert sorted(line["status"] for line in lines) == ["cancelled"] * 5 + ["error"] * 3
    assert fake.started == 2


async def test_queued_prompts_reach_ollama_in_arrival_order(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    prompts = ["alpha", "bravo", "charlie", "delta"]
    with gateway(fake_server, log_path, max_concurrency=1) as server:
        async with httpx.AsyncClient(timeout=STEP) as client:
            running = await SseStream.open(client, server.url, "first", "slow")
            queued: list[SseStream] = []
            try:
                assert (await running.next())[0] == "token"
                for position, prompt in enumerate(prompts, 1):
                    queued.append(await SseStream.open(client, server.url, prompt))
                    assert await queued[-1].next() == ("queued", {"position": position})
                await running.close()
                answers = [(await stream.rest())[-1] for stream in queued]
            finally:
                for stream in [running, *queued]:
                    await stream.close()

    assert [(name, data["response"]) for name, data in answers] == [("done", prompt) for prompt in prompts]
    assert [request["prompt"] for request in fake.requests] == ["first", *prompts]


async def test_sse_queued_events_count_down_and_queue_time_is_reported(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    with gateway(fake_server, log_path, max_concurrency=1) as server:
        async with httpx.AsyncClient(timeout=STEP) as client:
            running = await SseStream.open(client, server.url, "running", "slow")
            second = await SseStream.open(client, server.url, "second", "slow")
            third = await SseStream.open(client, server.url, "third one")
            try:
                assert await running.next() == ("token", {"content": "w0 "})
                assert await second.next() == ("queued", {"position": 1})
                assert await third.next() == ("queued", {"position": 2})
                await running.close()
                assert await second.next() == ("token", {"content": "w0 "})
                assert await third.next() == ("queued", {"position": 1})
                await second.close()
                third_rest = await third.rest()
                alone = await SseStream.open(client, server.url, "alone")
                alone_events = await alone.rest()
            finally:
                for stream in (running, second, third):
                    await stream.close()

    assert [name for name, _ in third_rest] == ["token", "token", "done"]
    done = third_rest[-1][1]
    assert done["response"] == "third one"
    assert done["timings"]["queue_ms"] > 0
    # Admitted at once: no queued event, and the measured queue time of a free slot (about 0 ms, not null).
    assert [name for name, _ in alone_events] == ["token", "done"]
    alone_queue_ms = alone_events[-1][1]["timings"]["queue_ms"]
    assert type(alone_queue_ms) is float and 0 <= alone_queue_ms < 100
    lines = by_prompt(read_log(log_path))
    assert type(lines["running"]["queue_ms"]) is float and 0 <= lines["running"]["queue_ms"] < 100
    assert lines["second"]["queue_ms"] > 0
    assert lines["third one"]["queue_ms"] == done["timings"]["queue_ms"]
    assert lines["alone"]["queue_ms"] == alone_queue_ms
    assert [lines[p]["status"] for p in ("running", "second", "third one", "alone")] == [
        "cancelled", "cancelled", "ok", "ok"
    ]  # fmt: skip


async def test_websocket_queued_frames_count_down_then_tokens_follow(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    with gateway(fake_server, log_path, max_concurrency=1) as server:
        url = f"{server.ws_url}/ws/generate"
        async with AsyncExitStack() as stack:
            running, second, third = [await stack.enter_async_context(connect(url)) for _ in range(3)]
            await running.send(json.dumps({"prompt": "running", "model": "slow"}))
            assert (await recv(running))["type"] == "start"
            assert await recv(running) == {"type": "token", "content": "w0 "}
            await second.send(json.dumps({"prompt": "second", "model": "slow"}))
            assert (await recv(second))["type"] == "start"
            assert await recv(second) == {"type": "queued", "position": 1}
            await third.send(json.dumps({"prompt": "third one"}))
            assert (await recv(third))["type"] == "start"
            assert await recv(third) == {"type": "queued", "position": 2}
            await running.close()
            assert await recv(second) == {"type": "token", "content": "w0 "}
            assert await recv(third) == {"type": "queued", "position": 1}
            await second.close()
            frames = await frames_until_end(third)
        await until(fake, lambda f: f.disconnects == 2)

    assert [frame["type"] for frame in frames] == ["token", "token", "done"]
    assert frames[-1]["response"] == "third one"
    assert frames[-1]["timings"]["queue_ms"] > 0
    lines = by_prompt(read_log(log_path))
    assert lines["running"]["status"] == "cancelled"
    assert type(lines["running"]["queue_ms"]) is float and 0 <= lines["running"]["queue_ms"] < 100
    assert (lines["third one"]["status"], lines["third one"]["queue_ms"]) == ("ok", frames[-1]["timings"]["queue_ms"])


@asynccontextmanager
async def queued_client(transport: str, client: httpx.AsyncClient, server: RunningServer) -> AsyncIterator[None]:
    """A client that joins the queue (at position 1) with the prompt "leaver", and leaves when the block ends."""
    if transport == "sse":
        stream = await SseStream.open(client, server.url, "leaver")
        try:
            assert await stream.next() == ("queued", {"position": 1})
            yield
        finally:
            await stream.close()
    elif transport == "ws":
        async with connect(f"{server.ws_url}/ws/generate") as ws:
            await ws.send(json.dumps({"prompt": "leaver"}))
            assert (await recv(ws))["type"] == "start"
            assert await recv(ws) == {"type": "queued", "position": 1}
            yield
    else:
        with raw_post(server, b'{"prompt": "leaver"}'):
            await wait_queued(client, server, 1)
            yield


@pytest.mark.parametrize("transport", ["rest", "sse", "ws"])
async def test_queued_client_leaving_frees_its_place_and_never_reaches_ollama(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, transport: str
) -> None:
    with gateway(fake_server, log_path, max_concurrency=1) as server:
        async with httpx.AsyncClient(timeout=STEP) as client:
            running = await SseStream.open(client, server.url, "running", "slow")
            behind: SseStream | None = None
            try:
                assert (await running.next())[0] == "token"
                async with queued_client(transport, client, server):
                    behind = await SseStream.open(client, server.url, "behind")
                    assert await behind.next() == ("queued", {"position": 2})
                assert await behind.next() == ("queued", {"position": 1})
                await running.close()
                await until(fake, lambda f: f.disconnects == 1)
                events = await behind.rest()
            finally:
                await running.close()
                if behind is not None:
                    await behind.close()

    assert [name for name, _ in events] == ["token", "done"]
    assert events[-1][1]["response"] == "behind"
    assert [request["prompt"] for request in fake.requests] == ["running", "behind"]
    assert (fake.started, fake.finished, fake.disconnects) == (2, 1, 1)
    leaver = by_prompt(read_log(log_path))["leaver"]
    assert (leaver["endpoint"], leaver["status"], leaver["done_reason"], leaver["response"]) == (
        transport, "cancelled", "cancelled", ""
    )  # fmt: skip


# --- timeouts name their setting, and close the upstream at once ------------------------------------------


@pytest.mark.parametrize("model", ["stall-headers", "hang"])
def test_first_token_timeout_is_504_naming_its_setting(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, model: str
) -> None:
    with gateway(fake_server, log_path, first_token_timeout=0.5, idle_timeout=5.0) as server:
        response = httpx.post(f"{server.url}/generate", json={"prompt": "hi", "model": model}, timeout=STEP)
        fake.wait_until(lambda f: f.disconnects == 1, timeout=1.0)

    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "backend_timeout"
    assert "MINIVAULT_FIRST_TOKEN_TIMEOUT=0.5" in error["message"]
    [line] = read_log(log_path)
    assert (line["status"], line["error"]["code"]) == ("error", "backend_timeout")


def test_idle_timeout_ends_the_stream_with_an_error_event_naming_its_setting(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    # The idle bound is shorter than the first-token one, so it must apply from the first token on.
    with gateway(fake_server, log_path, first_token_timeout=5.0, idle_timeout=0.5) as server:
        started = time.monotonic()
        body = {"prompt": "hi", "model": "stall", "stream": True}
        with httpx.stream("POST", f"{server.url}/generate", json=body, timeout=STEP) as response:
            assert response.status_code == 200
            events = list(parse_events(response.iter_lines()))
        elapsed = time.monotonic() - started
        fake.wait_until(lambda f: f.disconnects == 1, timeout=1.0)

    assert [name for name, _ in events] == ["token", "token", "error"]
    assert [data["content"] for _, data in events[:2]] == ["s0 ", "s1 "]
    error = events[-1][1]["error"]
    assert error["code"] == "backend_timeout"
    assert "MINIVAULT_IDLE_TIMEOUT=0.5" in error["message"]
    assert elapsed < 4.0
    [line] = read_log(log_path)
    assert (line["status"], line["error"]["code"], line["response"]) == ("error", "backend_timeout", "s0 s1 ")


def test_total_timeout_ends_a_flowing_answer_naming_its_setting(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    with gateway(fake_server, log_path, first_token_timeout=5.0, idle_timeout=5.0, total_timeout=0.6) as server:
        response = httpx.post(f"{server.url}/generate", json={"prompt": "hi", "model": "drip"}, timeout=STEP)
        fake.wait_until(lambda f: f.disconnects == 1, timeout=1.0)

    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "backend_timeout"
    assert "MINIVAULT_TOTAL_TIMEOUT=0.6" in error["message"]
    assert fake.finished == 0
    [line] = read_log(log_path)
    assert line["response"].startswith("d0 d1 ")


async def test_websocket_timeout_is_an_error_frame_and_the_socket_stays_open(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    with gateway(fake_server, log_path, first_token_timeout=5.0, idle_timeout=0.5) as server:
        async with connect(f"{server.ws_url}/ws/generate") as ws:
            await ws.send(json.dumps({"prompt": "hi", "model": "stall"}))
            frames = [await recv(ws)] + await frames_until_end(ws)
            await until(fake, lambda f: f.disconnects == 1, within=1.0)
            await ws.send(json.dumps({"prompt": "still here"}))
            after = await frames_until_end(ws)

    assert [frame["type"] for frame in frames] == ["start", "token", "token", "error"]
    assert frames[-1]["code"] == "backend_timeout"
    assert "MINIVAULT_IDLE_TIMEOUT=0.5" in frames[-1]["message"]
    assert frames[-1]["id"] == frames[0]["id"]
    assert (after[-1]["type"], after[-1]["response"]) == ("done", "still here")


# --- Ollama's own queue is full -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_busy_is_429_with_retry_after(
    minivault: RunningServer, fake: FakeOllama, log_path: Path, stream: bool
) -> None:
    response = httpx.post(f"{minivault.url}/generate", json={"prompt": "hi", "model": "busy", "stream": stream})

    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert (error["code"], error["retry_after"]) == ("busy", 1)
    assert "maximum pending requests exceeded" in error["message"]
    assert (fake.busy, fake.started) == (1, 0)
    minivault.stop()
    [line] = read_log(log_path)
    assert (line["endpoint"], line["status"], line["error"]["code"]) == ("sse" if stream else "rest", "error", "busy")


# --- a client that leaves mid-answer: the upstream request is closed within a second ---------------------


@pytest.mark.parametrize("transport", ["rest", "sse", "ws"])
async def test_client_leaving_mid_answer_closes_the_upstream_within_one_second(
    minivault: RunningServer, fake: FakeOllama, log_path: Path, transport: str
) -> None:
    if transport == "rest":
        with raw_post(minivault, b'{"prompt": "x", "model": "slow"}'):
            await until(fake, lambda f: f.started == 1)
    elif transport == "sse":
        async with httpx.AsyncClient(timeout=STEP) as client:
            stream = await SseStream.open(client, minivault.url, "x", "slow")
            try:
                assert await stream.next() == ("token", {"content": "w0 "})
            finally:
                await stream.close()
    else:
        async with connect(f"{minivault.ws_url}/ws/generate") as ws:
            await ws.send(json.dumps({"prompt": "x", "model": "slow"}))
            assert (await recv(ws))["type"] == "start"
            assert await recv(ws) == {"type": "token", "content": "w0 "}
    await until(fake, lambda f: f.disconnects == 1, within=1.0)

    assert fake.finished == 0
    minivault.stop()
    [line] = read_log(log_path)
    assert (line["endpoint"], line["status"]) == (transport, "cancelled")


# --- connection retries -----------------------------------------------------------------------------------


def flaky_transport(failures: list[Exception]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """Raises each of `failures` in turn, then answers 200; records every attempt."""
    attempts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        if len(attempts) <= len(failures):
            raise failures[len(attempts) - 1]
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(handler), attempts


def refused() -> httpx.ConnectError:
    return httpx.ConnectError("connection refused")


async def test_retry_connect_retries_refused_connections_until_one_succeeds() -> None:
    inner, attempts = flaky_transport([refused(), refused()])
    async with httpx.AsyncClient(transport=RetryConnect(inner, retries=2, backoff=0.001)) as client:
        response = await client.get("http://upstream.test/api/tags")

    assert response.status_code == 200
    assert len(attempts) == 3


@pytest.mark.parametrize(
    ("retries", "failures", "expected", "attempted"),
    [
        (0, [refused()], httpx.ConnectError, 1),
        (2, [refused(), refused(), refused()], httpx.ConnectError, 3),
        (2, [httpx.ReadTimeout("no answer")], httpx.ReadTimeout, 1),
        (2, [httpx.ConnectTimeout("no handshake")], httpx.ConnectTimeout, 1),
    ],
    ids=["no-retries", "retries-exhausted", "read-timeout-not-retried", "connect-timeout-not-retried"],
)
async def test_retry_connect_gives_up_when_it_must(
    retries: int, failures: list[Exception], expected: type[Exception], attempted: int
) -> None:
    inner, attempts = flaky_transport(failures)
    async with httpx.AsyncClient(transport=RetryConnect(inner, retries=retries, backoff=0.001)) as client:
        with pytest.raises(expected):
            await client.get("http://upstream.test/api/tags")

    assert len(attempts) == attempted


@pytest.mark.parametrize("request_while_down", [True, False])
def test_generation_recovers_after_ollama_restarts_without_restarting_minivault(
    log_path: Path, request_while_down: bool
) -> None:
    with FakeOllamaProcess() as ollama:
        settings = make_settings(ollama_base_url=ollama.url, log_path=log_path)
        with serve_in_thread(create_app(settings)) as server:
            before = httpx.post(f"{server.url}/generate", json={"prompt": "before"}, timeout=STEP)
            ollama.kill()
            down = None
            if request_while_down:
                down = httpx.post(f"{server.url}/generate", json={"prompt": "down"}, timeout=STEP)
            ollama.restart()
            # Without a request while it was down, the pool still holds the connection to the killed process.
            after = httpx.post(f"{server.url}/generate", json={"prompt": "after"}, timeout=STEP)

    assert (before.status_code, before.json()["response"]) == (200, "before")
    if down is not None:
        assert down.status_code == 503
        assert down.json()["error"]["code"] == "backend_unavailable"
        assert ollama.url in down.json()["error"]["message"]
    assert (after.status_code, after.json()["response"]) == (200, "after")


# --- warm start ---------------------------------------------------------------------------------------------


def test_warmup_loads_the_default_model_and_ready_says_loading_meanwhile(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    fake.loaded.clear()
    try:
        with gateway(fake_server, log_path, warmup=True) as server:
            fake.wait_until(lambda f: f.loads == 1)
            loading = httpx.get(f"{server.url}/ready")
            fake.loaded.set()
            ready = poll_ready(server, lambda r: r.status_code != 503)
    finally:
        fake.loaded.set()

    assert loading.status_code == 503
    assert (loading.json()["status"], loading.json()["reason"]) == ("loading", "loading")
    assert "MINIVAULT_WARMUP" in loading.json()["message"]
    assert (ready.status_code, ready.json()["status"]) == (200, "ready")
    assert fake.loads == 1
    assert fake.requests == [{"model": "tinyllama:1.1b-chat"}]


def test_no_warmup_sends_no_load_request(minivault: RunningServer, fake: FakeOllama) -> None:
    ready = httpx.get(f"{minivault.url}/ready")
    minivault.stop()

    assert ready.status_code == 200
    assert (fake.loads, fake.requests) == (0, [])


def test_failed_warmup_leaves_ready_unavailable_and_the_server_serving(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    with gateway(fake_server, log_path, warmup=True, ollama_model="nope") as server:
        ready = poll_ready(server, lambda r: r.json().get("reason") != "loading")
        generated = httpx.post(f"{server.url}/generate", json={"prompt": "still served", "model": "llama3"})

    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable"
    assert "ollama pull nope" in ready.json()["reason"]
    assert fake.requests[0] == {"model": "nope"}
    assert fake.loads == 0
    assert (generated.status_code, generated.json()["response"]) == (200, "still served")
