"""What the OpenAI- and Ollama-compatible routes cost beside MiniVault's own `/generate`: CPU per
request at concurrency 16 for the same 16-token answer from the same fake, in the same server, the
routes taking turns within each round. The dialects parse their own bodies and encode their own
frames; everything else (admission, the upstream call, the log, the history) is shared."""

import json
import statistics
from typing import Any

from bench.procs import Served
from bench.wrk import run_wrk

_MESSAGES = [{"role": "user", "content": "tokens=16"}]
ROUTES = {
    "native": ("/generate", {"prompt": "tokens=16"}),
    "native_stream": ("/generate", {"prompt": "tokens=16", "stream": True}),
    "openai": ("/v1/chat/completions", {"model": "bench:latest", "messages": _MESSAGES}),
    "openai_stream": ("/v1/chat/completions", {"model": "bench:latest", "messages": _MESSAGES, "stream": True}),
    "ollama": ("/api/generate", {"model": "bench:latest", "prompt": "tokens=16", "stream": False}),
    "ollama_stream": ("/api/chat", {"model": "bench:latest", "messages": _MESSAGES}),
}


def measure(minivault: Served, connections: int, rounds: int, seconds: float) -> dict[str, Any]:
    """Median CPU ms per request per route, and each dialect's ratio to `/generate` answering the same way
    (one JSON object, or a stream)."""
    cpu: dict[str, list[float]] = {name: [] for name in ROUTES}
    errors = 0
    for path, body in ROUTES.values():  # warm each route once
        run_wrk(f"{minivault.url}{path}", json.dumps(body), connections, 1)
    for _ in range(rounds):
        for name, (path, body) in ROUTES.items():
            before = minivault.cpu_seconds()
            result = run_wrk(f"{minivault.url}{path}", json.dumps(body), connections, seconds)
            cpu[name].append((minivault.cpu_seconds() - before) / max(result.requests, 1) * 1000)
            errors += result.errors
    medians = {name: statistics.median(values) for name, values in cpu.items()}
    results: dict[str, Any] = {f"dialect_{name}_cpu_ms": value for name, value in medians.items()}
    for name, value in medians.items():
        results[f"dialect_{name}_ratio"] = value / medians["native_stream" if name.endswith("_stream") else "native"]
    results["dialect_errors"] = errors
    return results
