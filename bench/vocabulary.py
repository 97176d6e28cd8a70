"""What issue 16's vocabulary (tools, images, thinking, formats) costs plain text requests: CPU per request at
concurrency 16 on `/generate` and both dialects, this tree against the commit before the issue (VOCABULARY_REV),
both keyed and limited as `on` is, against the same fake; the two servers take turns within each round and each
figure is the median over rounds of this tree's CPU divided by the previous commit's."""

import json
import statistics
from pathlib import Path
from typing import Any

from bench.dialects import ROUTES
from bench.gateway import ON_ENV, ON_HEADERS, baseline_tree, say
from bench.procs import ROOT, Served, start_minivault
from bench.wrk import run_wrk

# The commit before issue 16: plain text through `dict[str, str]` messages and bare-string streams.
VOCABULARY_REV = "9e87914"
MEASURED = ("native", "openai", "openai_stream", "ollama_stream")


def measure(fake: Served, workdir: Path, rounds: int, seconds: float) -> dict[str, Any]:
    """Per route: this tree's and the previous commit's CPU ms per request, and the median per-round ratio."""
    previous = baseline_tree(workdir, VOCABULARY_REV, "vocabulary-previous")
    if previous is None:
        say(f"no comparison with {VOCABULARY_REV}: git cannot provide it")
        return {"vocab_rev": None}
    servers = {
        "now": start_minivault(workdir, fake.url, name="vocab-now", env=ON_ENV, code=ROOT),
        "previous": start_minivault(workdir, fake.url, name="vocab-previous", env=ON_ENV, code=previous),
    }
    cpu: dict[tuple[str, str], list[float]] = {}
    errors = 0
    try:
        for served in servers.values():
            for route in MEASURED:
                path, body = ROUTES[route]
                run_wrk(f"{served.url}{path}", json.dumps(body), 16, 1, ON_HEADERS)
        for round_index in range(rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for route in MEASURED:
                path, body = ROUTES[route]
                for name in order:
                    served = servers[name]
                    before = served.cpu_seconds()
                    result = run_wrk(f"{served.url}{path}", json.dumps(body), 16, seconds, ON_HEADERS)
                    cpu.setdefault((name, route), []).append(
                        (served.cpu_seconds() - before) / max(result.requests, 1) * 1000
                    )
                    errors += result.errors
    finally:
        for served in servers.values():
            served.stop()
    results: dict[str, Any] = {"vocab_rev": VOCABULARY_REV, "vocab_errors": errors}
    for route in MEASURED:
        now, before = cpu[("now", route)], cpu[("previous", route)]
        results[f"vocab_{route}_now_cpu_ms"] = statistics.median(now)
        results[f"vocab_{route}_previous_cpu_ms"] = statistics.median(before)
        results[f"vocab_{route}_ratio"] = statistics.median(a / b for a, b in zip(now, before, strict=True))
    return results


LABELS = {
    "native": "/generate",
    "openai": "/v1/chat/completions",
    "openai_stream": "/v1/chat/completions streamed",
    "ollama_stream": "/api/chat streamed",
}


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """The table's rows: each route's CPU against the previous commit's, bound 1.05×."""
    if not r.get("vocab_rev"):
        return []
    return [
        (f"Plain text with issue 16's vocabulary, {LABELS[route]}: CPU per request, concurrency 16",
         f"{r[f'vocab_{route}_now_cpu_ms']:.2f} ms",
         f"{r['vocab_rev']} {r[f'vocab_{route}_previous_cpu_ms']:.2f} ms; {r[f'vocab_{route}_ratio']:.2f}× "
         "(median of per-round ratios)", "≤ 1.05×", r[f"vocab_{route}_ratio"] <= 1.05 and r["vocab_errors"] == 0)
        for route in MEASURED
    ]  # fmt: skip
