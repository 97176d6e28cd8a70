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

_PROMPT_KNOBS = re.compile(rb"(tokens|interval_ms|tools)=(\d+)")
_TAGS = orjson.dumps({"models": [{"name": "bench:latest", "model": "bench:latest", "size": 1}]})
_MODELS = orjson.dumps({"object": "list", "data": [{"id": "bench:latest", "object": "model", "owned_by": "fake"}]})
_INFO = {b"/api/tags": _TAGS, b"/api/ps": _TAGS, b"/api/version": b'{"version":"0.0.0-fast"}',  # the model is loaded
         b"/v1/models": _MODELS}  # fmt: skip


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
        if method == b"post" and path in (b"/api/generate", b"/api/chat", b"/v1/chat/completions"):
            knobs = dict(_PROMPT_KNOBS.findall(body))
            tokens, interval = int(knobs.get(b"tokens", 16)), int(knobs.get(b"interval_ms", 0)) * self.slowdown / 1000
            wire = _WIRES[path, knobs.get(b"tools", b"0") != b"0"]
            if interval:
                self.streaming = asyncio.get_running_loop().create_task(self._slot_then_paced(tokens, interval, wire))
            else:
                self.transport.write(
                    wire.head + b"".join(_chunk(wire.line()) for _ in range(tokens)) + wire.end(tokens)
                )
        elif path in _INFO:
            payload = _INFO[path]
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(payload), payload))  # fmt: skip
        else:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")

    async def _slot_then_paced(self, tokens: int, interval: float, wire: "_Wire") -> None:
        if self.slots is None:
            await self._paced(tokens, interval, wire)
            return
        async with self.slots:
            await self._paced(tokens, interval, wire)

    async def _paced(self, tokens: int, interval: float, wire: "_Wire") -> None:
        assert self.transport is not None
        self.transport.write(wire.head)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index in range(tokens):
            # The first token goes out at once (no timer phase in time-to-first-token); later ones
            # on absolute deadlines, so timer slack does not accumulate over a long answer.
            if index:
                await asyncio.sleep(max(0.0, start + index * interval - loop.time()))
            self.transport.write(_chunk(wire.line()))
        self.transport.write(wire.end(tokens))
        self.streaming = None


_HEADERS = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"


def _token_line() -> bytes:
    return b'{"model":"bench","response":"t%d ","done":false}\n' % time.monotonic_ns()


def _chat_line() -> bytes:
    return b'{"model":"bench","message":{"role":"assistant","content":"t%d "},"done":false}\n' % time.monotonic_ns()


def _final(tokens: int) -> bytes:
    done = b'{"model":"bench","response":"","done":true,"done_reason":"stop","prompt_eval_count":8,"eval_count":%d}\n'
    return _chunk(done % tokens) + b"0\r\n\r\n"


# An OpenAI-compatible server's stream (`/v1/chat/completions`): text deltas, or with `tools=1` in the prompt one
# tool call whose arguments come in `tokens` fragments (`{"a":"` first, `"}` last, so they parse as a whole).
_SSE_HEADERS = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
_CHOICE = b'data: {"id":"x","object":"chat.completion.chunk","model":"bench","choices":[{"index":0,"delta":%s,'


def _sse_text_line() -> bytes:
    return _CHOICE % (b'{"content":"t%d "}' % time.monotonic_ns()) + b'"finish_reason":null}]}\n\n'


def _sse_tool_line() -> bytes:
    fragment = b'{"tool_calls":[{"index":0,"function":{"arguments":"t%d "}}]}' % time.monotonic_ns()
    return _CHOICE % fragment + b'"finish_reason":null}]}\n\n'


def _sse_end(reason: bytes, first: bytes = b"", last: bytes = b"") -> Callable[[int], bytes]:
    def end(tokens: int) -> bytes:
        usage = (
            b'data: {"id":"x","object":"chat.completion.chunk","model":"bench","choices":[],"usage":'
            b'{"prompt_tokens":8,"completion_tokens":%d,"total_tokens":%d}}\n\n' % (tokens, tokens + 8)
        )
        frames = last + _CHOICE % b"{}" + b'"finish_reason":"' + reason + b'"}]}\n\n' + usage + b"data: [DONE]\n\n"
        return _chunk(frames) + b"0\r\n\r\n"

    return end


_TOOL_OPEN = (b'{"role":"assistant","tool_calls":[{"index":0,"id":"call_bench","type":"function",'
              b'"function":{"name":"lookup","arguments":"{\\"a\\":\\""}}]}')  # fmt: skip
_TOOL_START = _CHOICE % _TOOL_OPEN + b'"finish_reason":null}]}\n\n'
_TOOL_LAST = _CHOICE % b'{"tool_calls":[{"index":0,"function":{"arguments":"\\"}"}}]}' + b'"finish_reason":null}]}\n\n'


class _Wire:
    """One stream format: the response head (with, for a tool call, its opening frame), a line per token, the end."""

    __slots__ = ("head", "line", "end")

    def __init__(self, head: bytes, line: Callable[[], bytes], end: Callable[[int], bytes]) -> None:
        self.head, self.line, self.end = head, line, end


_WIRES = {
    (b"/api/generate", False): _Wire(_HEADERS, _token_line, _final),
    (b"/api/generate", True): _Wire(_HEADERS, _token_line, _final),
    (b"/api/chat", False): _Wire(_HEADERS, _chat_line, _final),
    (b"/api/chat", True): _Wire(_HEADERS, _chat_line, _final),
    (b"/v1/chat/completions", False): _Wire(_SSE_HEADERS, _sse_text_line, _sse_end(b"stop")),
    (b"/v1/chat/completions", True): _Wire(_SSE_HEADERS + _chunk(_TOOL_START), _sse_tool_line,
                                           _sse_end(b"tool_calls", last=_TOOL_LAST)),
}  # fmt: skip


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
