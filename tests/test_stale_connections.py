"""An upstream that closes idle connections after N seconds, as llama.cpp's server does after its announced
`Keep-Alive: timeout=5`: requests spaced N - 0.1, N and N + 0.1 s apart never fail, on either transport.

The server is raw asyncio on loopback (its own thread and loop), speaking just enough OpenAI-compatible SSE;
the requests go through the whole OpenAI-compatible backend over MiniVault's pooled client. `late_fin` mode
closes a connection when the next request arrives too late instead of at the N-th second: the client's view
when the server's FIN is still in flight as the request goes out, the race behind the intermittent 502, made
deterministic.
"""

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import pytest

from app.backends.base import ChatInput, Completion, Upstream
from app.backends.openai_compat import OpenAICompatBackend
from app.backends.transport import IDLE_EXPIRY, idle_expiry_for, upstream_transport
from app.errors import MiniVaultError
from tests.conftest import make_settings

pytestmark = pytest.mark.anyio

N = 1  # the upstream's idle timeout, in whole seconds as `Keep-Alive: timeout=N` carries it
GAPS = [N - 0.1, N, N + 0.1]
TRANSPORTS = ["aiohttp", "httpx"]

# What the server does with the k-th request (from 1) on a connection: answer it, or one of the failures.
Action = Callable[[int], str]


def always_answer(index: int) -> str:
    return "answer"


class IdleClosingServer:
    """HTTP/1.1 keep-alive server on a loopback port that closes a connection idle for `idle` seconds."""

    def __init__(self, idle: float = N, *, announce: bool = True, late_fin: bool = False,
                 action: Action = always_answer) -> None:  # fmt: skip
        self.idle, self.announce, self.late_fin, self.action = idle, announce, late_fin, action
        self.connections = 0  # accepted
        self.requests = 0  # heads read, answered or not
        self.closed_idle = 0  # connections closed at the N-th idle second, with no request pending
        self.dropped = 0  # requests read and left unanswered (late_fin, or the action said so)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "IdleClosingServer":
        self._thread.start()
        assert self._ready.wait(10), "the test server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the test server did not stop"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        answered_at: float | None = None
        index = 0
        try:
            while True:
                read = reader.readuntil(b"\r\n\r\n")
                if answered_at is None or self.late_fin:
                    head = await read
                else:
                    try:
                        head = await asyncio.wait_for(read, answered_at + self.idle - time.monotonic())
                    except TimeoutError:
                        self.closed_idle += 1
                        return
                self.requests += 1
                index += 1
                length = next(
                    (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:")), 0,
                )  # fmt: skip
                body = await reader.readexactly(length)
                action = self.action(index)
                if self.late_fin and answered_at is not None and time.monotonic() - answered_at >= self.idle:
                    action = "drop"
                if action == "drop":
                    self.dropped += 1
                    return
                if action == "partial_head":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/ev")
                    await writer.drain()
                    return
                prompt = json.loads(body)["messages"][-1]["content"]
                writer.write(self._head())
                writer.write(_chunk(_event({"choices": [{"index": 0, "delta": {"content": prompt}}]})))
                if action == "partial_body":
                    await writer.drain()
                    return
                finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
                writer.write(_chunk(_event(finish)) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
                await writer.drain()
                answered_at = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _head(self) -> bytes:
        announced = f"Keep-Alive: timeout={self.idle:g}\r\n" if self.announce else ""
        return (
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            f"Connection: keep-alive\r\n{announced}\r\n"
        ).encode()


def _event(payload: object) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@asynccontextmanager
async def backend_for(server: IdleClosingServer, transport: str, **knobs: float | bool) -> AsyncIterator[
    OpenAICompatBackend
]:  # fmt: skip
    """The OpenAI-compatible backend over MiniVault's pooled transport to `server` (no connect retries)."""
    import httpx

    settings = make_settings(backend="openai", upstream_transport=transport, upstream_retries=0)
    client = httpx.AsyncClient(base_url=server.url, timeout=10, transport=upstream_transport(settings, **knobs))
    upstream = Upstream("the test upstream", server.url, "it is a test")
    async with client:
        yield OpenAICompatBackend(client, server.url, "m", upstream=upstream)


async def ask(backend: OpenAICompatBackend, prompt: str) -> str:
    return "".join([text async for text in backend.stream(ChatInput.single("m", prompt), Completion())])


@dataclass
class Run:
    answers: int = 0
    failures: int = 0
    requests: int = 0


async def spaced_requests(backend: OpenAICompatBackend, gaps: list[float]) -> Run:
    """One request, then one more after each gap (measured from the end of the previous answer)."""
    run = Run()
    for i, gap in enumerate([0.0, *gaps]):
        if gap:
            await asyncio.sleep(gap)  # the spacing is what is under test
        run.requests += 1
        try:
            assert await ask(backend, f"prompt {i}") == f"prompt {i}"
            run.answers += 1
        except MiniVaultError:
            run.failures += 1
    return run


@contextmanager
def servers(*configs: dict[str, object]) -> Iterator[list[IdleClosingServer]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(IdleClosingServer(**config)) for config in configs]  # type: ignore[arg-type]


async def run_all(pairs: list[tuple[IdleClosingServer, str, dict[str, float | bool]]], gaps: list[float]) -> list[Run]:
    """The spaced requests of every (server, transport, knobs) at once: they share the time the gaps take."""

    async def one(server: IdleClosingServer, transport: str, knobs: dict[str, float | bool]) -> Run:
        async with backend_for(server, transport, **knobs) as backend:
            return await spaced_requests(backend, gaps)

    return list(await asyncio.gather(*(one(*pair) for pair in pairs)))


async def test_requests_at_the_upstreams_idle_timeout_never_fail() -> None:
    # 16 requests per pair, 64 in all: 5 rounds of the N - 0.1, N, N + 0.1 s gaps.
    gaps = GAPS * 5
    modes = [{"late_fin": False}, {"late_fin": True}]
    with servers(*modes, *modes) as (eager_a, late_a, eager_h, late_h):
        pairs = [(eager_a, "aiohttp", {}), (late_a, "aiohttp", {}), (eager_h, "httpx", {}), (late_h, "httpx", {})]
        runs = await run_all(pairs, gaps)

    assert [(run.answers, run.failures) for run in runs] == [(len(gaps) + 1, 0)] * 4
    # Every gap outlives the 0.5 s the announced timeout=1 leaves: each request had a connection of its own.
    assert [server.connections for server in (eager_a, late_a, eager_h, late_h)] == [len(gaps) + 1] * 4
    assert [server.dropped for server in (eager_a, late_a, eager_h, late_h)] == [0] * 4


async def test_each_half_of_the_fix_alone_keeps_every_request() -> None:
    gaps = GAPS * 3
    # The expiry alone (no retry): the announced timeout makes every gap open a new connection.
    # The retry alone (nothing announced, connections kept N + 1 s): each dead reused one is retried once.
    expiry_only = {"stale_retry": False}
    retry_only = {"idle_expiry": N + 1.0}
    configs = [{"late_fin": True}, {"late_fin": True, "announce": False}] * 2
    with servers(*configs) as (announced_a, silent_a, announced_h, silent_h):
        pairs = [
            (announced_a, "aiohttp", expiry_only), (silent_a, "aiohttp", retry_only),
            (announced_h, "httpx", expiry_only), (silent_h, "httpx", retry_only),
        ]  # fmt: skip
        runs = await run_all(pairs, gaps)

    assert [(run.answers, run.failures) for run in runs] == [(len(gaps) + 1, 0)] * 4
    assert (announced_a.dropped, announced_h.dropped) == (0, 0)
    # In each N, N + 0.1 pair of gaps one request reused a connection the server had given up: 3 at least.
    assert silent_a.dropped >= 3 and silent_h.dropped >= 3, (silent_a.dropped, silent_h.dropped)
    assert (silent_a.requests, silent_h.requests) == (
        len(gaps) + 1 + silent_a.dropped,
        len(gaps) + 1 + silent_h.dropped,
    )


async def test_without_the_fix_reused_connections_fail() -> None:
    # The code before: connections kept longer than the upstream keeps them, nothing read from Keep-Alive, no retry.
    gaps = GAPS * 3
    before = {"idle_expiry": N + 1.0, "stale_retry": False}
    with servers({"late_fin": True, "announce": False}, {"late_fin": True, "announce": False}) as (on_a, on_h):
        runs = await run_all([(on_a, "aiohttp", before), (on_h, "httpx", before)], gaps)

    assert [run.failures for run in runs] == [on_a.dropped, on_h.dropped]
    assert all(run.failures >= 3 for run in runs), [run.failures for run in runs]


def second_request(action: str) -> Action:
    """The first request on each connection is answered; the second meets `action`."""
    return lambda index: action if index == 2 else "answer"


@pytest.mark.parametrize(
    ("transport", "action", "retried"),
    [
        ("aiohttp", "drop", True), ("httpx", "drop", True),
        ("aiohttp", "partial_head", False),
        # httpcore says "Server disconnected without sending a response." of a cut head too: retried (README).
        ("httpx", "partial_head", True),
        ("aiohttp", "partial_body", False), ("httpx", "partial_body", False),
    ],
    ids=[
        "closed-unanswered-is-retried-aiohttp", "closed-unanswered-is-retried-httpx",
        "part-of-the-head-is-not-aiohttp", "part-of-the-head-is-httpx",
        "part-of-the-body-is-not-aiohttp", "part-of-the-body-is-not-httpx",
    ],
)  # fmt: skip
async def test_only_a_reused_connection_closed_before_any_answer_is_retried(
    transport: str, action: str, retried: bool
) -> None:
    with IdleClosingServer(idle=60, action=second_request(action)) as server:
        async with backend_for(server, transport) as backend:
            assert await ask(backend, "first") == "first"
            if retried:
                assert await ask(backend, "second") == "second"
            else:
                with pytest.raises(MiniVaultError):
                    await ask(backend, "second")

    # Retried: the dropped request went out again on a second connection. Not retried: two requests, one connection.
    assert (server.requests, server.connections) == ((3, 2) if retried else (2, 1))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_new_connection_closed_before_any_answer_is_not_retried(transport: str) -> None:
    # The upstream read the request on a connection opened for it and gave up: it may have started the generation.
    with IdleClosingServer(idle=60, action=lambda index: "drop") as server:
        async with backend_for(server, transport) as backend:
            with pytest.raises(MiniVaultError):
                await ask(backend, "only once")

    assert (server.requests, server.connections, server.dropped) == (1, 1, 1)


@pytest.mark.parametrize(
    ("announced", "kept"), [(1, 0.5), (2, 1.5), (5, 4.0), (10, 8.0), (0, 0.0)]
)  # fmt: skip
def test_idle_expiry_stays_below_the_announced_timeout(announced: float, kept: float) -> None:
    assert idle_expiry_for(announced) == pytest.approx(kept)
    assert IDLE_EXPIRY < 5  # llama.cpp's server, uvicorn and Node close idle connections after 5 s
