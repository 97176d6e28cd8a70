"""The fake Ollama's fast mode: the same `/api/generate` and `/api/chat` NDJSON streams from a bare asyncio protocol.

Made for benchmarks, where the upstream must cost far less than the proxy under test (about
tens of microseconds of CPU per request). The prompt steers it: `tokens=N interval_ms=M`
(defaults 16 and 0) sets the answer's length and pacing. Each token is `t<monotonic ns> `, the
moment it was sent, so a client on the same machine can measure each token's delay end to end.
FAKE_OLLAMA_SLOWDOWN=F multiplies every interval: several fakes given the same prompt are hosts of different speeds.
FAKE_OLLAMA_PARALLEL=N generates at most N paced answers at once and queues the rest in arrival order, sending
their headers when their turn comes, as Ollama does with OLLAMA_NUM_PARALLEL (0, the default: no limit).
"""

import asyncio
import os
import re
import time
from collections.abc import Callable

import orjson

_PROMPT_KNOBS = re.compile(rb"(tokens|interval_ms)=(\d+)")
_TAGS = orjson.dumps({"models": [{"name": "bench:latest", "model": "bench:latest", "size": 1}]})
_INFO = {b"/api/tags": _TAGS, b"/api/ps": _TAGS, b"/api/version": b'{"version":"0.0.0-fast"}'}  # the model is loaded


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class FastOllamaProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; requests are answered in order."""

    def __init__(self, slowdown: float = 1.0, slots: asyncio.Semaphore | None = None) -> None:
        self.slowdown = slowdown
        self.slots = slots
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        # Like Ollama: a client hanging up stops the generation.
        if self.streaming is not None:
            self.streaming.cancel()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].lower() + b"\r\n"
            length_at = head.find(b"content-length:")
            length = int(head[length_at + 15 : head.find(b"\r\n", length_at)].strip() or 0) if length_at >= 0 else 0
            if len(self.buffer) < head_end + 4 + length:
                return
            body = self.buffer[head_end + 4 : head_end + 4 + length]
            self.buffer = self.buffer[head_end + 4 + length :]
            self._handle(head.split(b" ", 2)[:2], body)

    def _handle(self, request_line: list[bytes], body: bytes) -> None:
        assert self.transport is not None
        method, path = request_line if len(request_line) == 2 else (b"", b"")
        if method == b"post" and path in (b"/api/generate", b"/api/chat"):
            knobs = dict(_PROMPT_KNOBS.findall(body))
            line = _token_line if path == b"/api/generate" else _chat_line
            tokens, interval = int(knobs.get(b"tokens", 16)), int(knobs.get(b"interval_ms", 0)) * self.slowdown / 1000
            if interval:
                self.streaming = asyncio.get_running_loop().create_task(self._slot_then_paced(tokens, interval, line))
            else:
                self.transport.write(_HEADERS + b"".join(_chunk(line()) for _ in range(tokens)) + _final(tokens))
        elif path in _INFO:
            payload = _INFO[path]
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(payload), payload))  # fmt: skip
        else:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

    async def _slot_then_paced(self, tokens: int, interval: float, line: Callable[[], bytes]) -> None:
        if self.slots is None:
            await self._paced(tokens, interval, line)
            return
        async with self.slots:
            await self._paced(tokens, interval, line)

    async def _paced(self, tokens: int, interval: float, line: Callable[[], bytes]) -> None:
        assert self.transport is not None
        self.transport.write(_HEADERS)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index in range(tokens):
            # The first token goes out at once (no timer phase in time-to-first-token); later ones
            # on absolute deadlines, so timer slack does not accumulate over a long answer.
            if index:
                await asyncio.sleep(max(0.0, start + index * interval - loop.time()))
            self.transport.write(_chunk(line()))
        self.transport.write(_final(tokens))
        self.streaming = None


_HEADERS = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"


def _token_line() -> bytes:
    return b'{"model":"bench","response":"t%d ","done":false}\n' % time.monotonic_ns()


def _chat_line() -> bytes:
    return b'{"model":"bench","message":{"role":"assistant","content":"t%d "},"done":false}\n' % time.monotonic_ns()


def _final(tokens: int) -> bytes:
    done = b'{"model":"bench","response":"","done":true,"done_reason":"stop","prompt_eval_count":8,"eval_count":%d}\n'
    return _chunk(done % tokens) + b"0\r\n\r\n"


async def serve(host: str, port: int) -> None:
    """Serve until cancelled."""
    slowdown = float(os.environ.get("FAKE_OLLAMA_SLOWDOWN", "1"))
    parallel = int(os.environ.get("FAKE_OLLAMA_PARALLEL", "0"))
    slots = asyncio.Semaphore(parallel) if parallel > 0 else None  # asyncio's waiters are served in FIFO order
    server = await asyncio.get_running_loop().create_server(
        lambda: FastOllamaProtocol(slowdown, slots), host, port, backlog=4096
    )
    async with server:
        await server.serve_forever()
