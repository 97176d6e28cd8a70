"""Streaming measurements: time to first token, relay CPU per token, and many concurrent websockets.

Tokens from the fast fake carry the monotonic time they were sent (`t<ns> `), so a client on
the same machine measures each token's delay from the fake to itself.
"""

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect

from bench.procs import Served


def prompt(tokens: int, interval_ms: int) -> str:
    return f"tokens={tokens} interval_ms={interval_ms}"


class RawHttp:
    """A keep-alive HTTP/1.1 connection with next to no client overhead, for timing first bytes.

    A full client library adds about a millisecond per request on these machines, which would
    swamp what is being measured; this writes a prepared request and scans the raw bytes.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def first_token(self, path: str, body: dict[str, Any], marker: bytes) -> float:
        """Seconds from sending the request to the first bytes containing `marker`; reads the response to its end."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        request = f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        started = time.perf_counter()
        self.writer.write(request)
        received, first = b"", None
        while not received.endswith(b"\r\n0\r\n\r\n"):
            chunk = await self.reader.read(65536)
            if not chunk:
                raise RuntimeError("the server closed the connection")
            received += chunk
            if first is None and marker in received:
                first = time.perf_counter() - started
        if first is None:
            raise RuntimeError(f"no {marker!r} in the response")
        return first

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def ttft_ws(ws: ClientConnection, text: str) -> float:
    started = time.perf_counter()
    await ws.send(json.dumps({"prompt": text}))
    first = None
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == "token" and first is None:
            first = time.perf_counter() - started
        elif frame["type"] in ("done", "error"):
            if frame["type"] == "error" or first is None:
                raise RuntimeError(f"websocket stream failed: {frame}")
            return first


async def time_to_first_token(fake: Served, minivault: Served, runs: int) -> dict[str, float]:
    """Median TTFT of the fake alone, and what MiniVault adds over SSE and websocket, interleaved."""
    text = prompt(256, 1)
    direct, proxied = RawHttp(fake.port), RawHttp(minivault.port)
    fake_times, sse_times, ws_times = [], [], []
    async with connect(f"ws://127.0.0.1:{minivault.port}/ws/generate") as ws:
        try:
            for index in range(runs + 3):  # the first three warm up
                times = (
                    await direct.first_token("/api/generate", {"model": "bench:latest", "prompt": text},
                                             b'"response":"t'),
                    await proxied.first_token("/generate", {"prompt": text, "stream": True}, b"event: token"),
                    await ttft_ws(ws, text),
                )  # fmt: skip
                if index >= 3:
                    for series, value in zip((fake_times, sse_times, ws_times), times, strict=True):
                        series.append(value)
        finally:
            await direct.close()
            await proxied.close()
    fake_ms = statistics.median(fake_times) * 1000
    return {
        "fake_ttft_ms": fake_ms,
        "sse_ttft_added_ms": statistics.median(sse_times) * 1000 - fake_ms,
        "ws_ttft_added_ms": statistics.median(ws_times) * 1000 - fake_ms,
    }


async def _sse_stream(client: httpx.AsyncClient, minivault: Served, text: str) -> None:
    async with client.stream("POST", f"{minivault.url}/generate", json={"prompt": text, "stream": True}) as response:
        response.raise_for_status()
        async for _ in response.aiter_bytes():
            pass


async def _ws_stream(url: str, text: str, count: int) -> None:
    async with connect(url) as ws:
        for _ in range(count):
            await ws.send(json.dumps({"prompt": text}))
            while json.loads(await ws.recv())["type"] not in ("done", "error"):
                pass


async def relay_cpu_per_token(minivault: Served, streams: int, parallel: int) -> dict[str, float]:
    """Server CPU for 256-token streams minus 16-token streams, per extra token, for SSE and websocket."""
    long_text, short_text = prompt(256, 1), prompt(16, 1)
    extra_tokens = streams * (256 - 16)
    results: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=parallel)) as client:

        async def sse(text: str) -> None:
            await _gather_limited(streams, parallel, lambda: _sse_stream(client, minivault, text))

        async def ws(text: str) -> None:
            per = streams // parallel
            await asyncio.gather(*(_ws_stream(f"ws://127.0.0.1:{minivault.port}/ws/generate", text, per)
                                   for _ in range(parallel)))  # fmt: skip

        for name, run in (("sse", sse), ("ws", ws)):
            await run(short_text)  # warm-up
            costs = {}
            for label, text in (("long", long_text), ("short", short_text)):
                before = minivault.cpu_seconds()
                await run(text)
                costs[label] = minivault.cpu_seconds() - before
            results[f"{name}_relay_us_per_token"] = (costs["long"] - costs["short"]) / extra_tokens * 1e6
    return results


async def _gather_limited(total: int, parallel: int, make: Callable[[], Awaitable[None]]) -> None:
    semaphore = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with semaphore:
            await make()

    await asyncio.gather(*(one() for _ in range(total)))


async def many_websockets(
    minivault: Served, count: int, tokens: int, interval_ms: int, ramp: float = 1.0
) -> dict[str, float]:
    """`count` websockets streaming at once; each token's delay from the fake to this client."""
    delays_ns: list[int] = []
    errors = 0
    url = f"ws://127.0.0.1:{minivault.port}/ws/generate"
    opening = asyncio.Semaphore(50)
    ready = 0
    everyone_ready = asyncio.Event()

    async def one(index: int) -> None:
        nonlocal errors, ready
        try:
            async with opening:
                ws = await connect(url, open_timeout=30, ping_interval=None, max_queue=None)
            async with ws:
                ready += 1
                if ready == count:
                    everyone_ready.set()
                await everyone_ready.wait()
                # Independent users do not all start in the same millisecond: spread the starts over
                # `ramp` seconds, or all 500 upstream connections and every stream's tokens would
                # be due at the same instant.
                await asyncio.sleep(ramp * index / count)
                await ws.send(json.dumps({"prompt": prompt(tokens, interval_ms)}))
                received = 0
                while True:
                    frame = orjson.loads(await ws.recv(decode=False))
                    if frame["type"] == "token":
                        delays_ns.append(time.monotonic_ns() - int(frame["content"].strip()[1:]))
                        received += 1
                    elif frame["type"] == "done":
                        if received != tokens:
                            errors += 1
                        return
                    elif frame["type"] == "error":
                        errors += 1
                        return
        except Exception:  # noqa: BLE001 - a benchmark counts failures instead of stopping
            errors += 1
            everyone_ready.set()

    started = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(count)))
    delays_ms = sorted(d / 1e6 for d in delays_ns)
    return {
        "ws_streams": count,
        "ws_stream_errors": errors,
        "ws_tokens_received": len(delays_ms),
        "ws_token_delay_p50_ms": delays_ms[len(delays_ms) // 2] if delays_ms else float("nan"),
        "ws_token_delay_p99_ms": delays_ms[int(len(delays_ms) * 0.99)] if delays_ms else float("nan"),
        "ws_streams_seconds": time.perf_counter() - started,
    }


_LOOKUP = {"type": "function", "function": {"name": "lookup", "description": "Look a value up.",
           "parameters": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}  # fmt: skip


async def _openai_stream(client: httpx.AsyncClient, minivault: Served, text: str, tools: bool) -> None:
    body: dict[str, Any] = {"model": "bench:latest", "stream": True, "messages": [{"role": "user", "content": text}]}
    if tools:
        body["tools"] = [_LOOKUP]
    async with client.stream("POST", f"{minivault.url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for _ in response.aiter_bytes():
            pass


async def relay_cpu_per_chunk_openai(minivault: Served, streams: int, parallel: int) -> dict[str, float]:
    """/v1/chat/completions streamed from an OpenAI-compatible upstream: server CPU per extra chunk of text
    deltas, and of a tool call's argument fragments (256-chunk streams minus 16-chunk ones)."""
    extra_chunks = streams * (256 - 16)
    results: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=parallel)) as client:
        for name, tools in (("text", False), ("tool_call", True)):
            suffix = " tools=1" if tools else ""

            async def run(tokens: int, tools: bool = tools, suffix: str = suffix) -> None:
                text = prompt(tokens, 1) + suffix
                await _gather_limited(streams, parallel, lambda: _openai_stream(client, minivault, text, tools))

            await run(16)  # warm-up
            costs = {}
            for tokens in (256, 16):
                before = minivault.cpu_seconds()
                await run(tokens)
                costs[tokens] = minivault.cpu_seconds() - before
            results[f"openai_{name}_relay_us_per_chunk"] = (costs[256] - costs[16]) / extra_chunks * 1e6
    return results
