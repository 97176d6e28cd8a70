"""The interaction log writer alone: lines per second, and the event loop's lag while it writes.

The baseline, measured in the same run, is the naive approach: write and flush each line on the
event loop itself.
"""

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from app.exchanges import JsonlWriter

RECORD: dict[str, Any] = {
    "id": "5f0c3f7e2b9d4c3e8a1b2c3d4e5f6a7b", "ts": "2026-11-24T21:40:56.445Z", "endpoint": "rest",
    "client": "127.0.0.1:58936", "backend": "ollama", "model": "tinyllama:1.1b-chat",
    "prompt": "Explain gravity in one sentence.", "system": None, "options": {"temperature": 0.2},
    "response": "Gravity is the force by which a planet or other body draws objects toward its center. " * 3,
    "status": "ok", "error": None, "done_reason": "stop", "prompt_tokens": 24, "completion_tokens": 61,
    "ttft_ms": 23.8, "latency_ms": 845.4,
}  # fmt: skip


async def _with_lag_monitor(work: Callable[[], Any]) -> tuple[float, list[float]]:
    lags: list[float] = []
    stop = asyncio.Event()

    async def monitor() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - before - 0.001)

    watcher = asyncio.create_task(monitor())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    await work()
    elapsed = time.perf_counter() - started
    stop.set()
    await watcher
    return elapsed, sorted(lags)


async def measure(directory: Path, lines: int) -> dict[str, float]:
    async def threaded() -> None:
        writer = JsonlWriter(directory / "writer.jsonl")
        writer.start()
        for index in range(lines):
            writer.write(RECORD)
            if index % 100 == 0:
                await asyncio.sleep(0)  # a server interleaves requests with its writes
        await writer.aclose()  # returns once every line is on disk

    async def naive() -> None:
        with open(directory / "naive.jsonl", "ab") as file:
            for index in range(lines):
                file.write(orjson.dumps(RECORD) + b"\n")
                file.flush()
                if index % 100 == 0:
                    await asyncio.sleep(0)

    results = {}
    await threaded()  # warm-up: first-use costs (imports, file creation) are not the steady state
    (directory / "writer.jsonl").unlink()
    for name, work in (("writer", threaded), ("naive", naive)):
        elapsed, lags = await _with_lag_monitor(work)
        written = len((directory / f"{name}.jsonl").read_bytes().splitlines())
        assert written == lines, f"{name}: {written} of {lines} lines on disk"
        results[f"{name}_lines_per_s"] = lines / elapsed
        results[f"{name}_loop_lag_p99_ms"] = lags[int(len(lags) * 0.99)] * 1000 if lags else 0.0
        results[f"{name}_loop_lag_max_ms"] = lags[-1] * 1000 if lags else 0.0
    return results


def main() -> None:
    """Run in a fresh process (`python -m bench.logwriter DIR LINES`): the measurement must not
    inherit the benchmark client's heap, whose garbage collections would show up as loop lag."""
    import gc
    import sys

    import uvloop

    gc.collect()
    gc.freeze()  # as MiniVault does after start-up
    results = uvloop.run(measure(Path(sys.argv[1]), int(sys.argv[2])))
    sys.stdout.write(orjson.dumps(results).decode() + "\n")


if __name__ == "__main__":
    main()
