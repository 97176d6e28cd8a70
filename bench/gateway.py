"""What the gateway features cost on the hot path, all measured in one run against the same fake:

- `on`: API key required (and sent), admission limits on (16 slots, queue 64), metrics on;
- `off`: the same code with no keys and limits too wide to matter (metrics cannot be turned off);
- `baseline`: the version before these features (BASELINE_REV), when git can provide its tree.
Rounds rotate the order of the servers, and each figure is the median over rounds.
"""

import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from bench.procs import ROOT, Served, start_minivault
from bench.wrk import run_wrk

# The last commit before API keys, admission control and metrics: "today's figure" for this comparison.
BASELINE_REV = "f420d3f"
KEY = "bench-key"
ON_ENV = {"MINIVAULT_API_KEYS": KEY, "MINIVAULT_MAX_CONCURRENCY": "16", "MINIVAULT_MAX_QUEUE": "64"}
ON_HEADERS = {"Authorization": f"Bearer {KEY}"}


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def baseline_tree(workdir: Path) -> Path | None:
    """BASELINE_REV's files, unpacked from git; None (and why) when the clone lacks that commit."""
    target = workdir / "baseline"
    target.mkdir(exist_ok=True)
    archive = subprocess.run(["git", "archive", BASELINE_REV], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        say(f"no baseline: git cannot provide {BASELINE_REV} ({archive.stderr.decode().strip()})")
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def measure(fake: Served, workdir: Path, rounds: int, seconds: float, generate_body: str, fake_body: str
            ) -> dict[str, Any]:  # fmt: skip
    """Added latency at concurrency 1 and CPU per request at concurrency 16, per variant."""
    variants: dict[str, tuple[dict[str, str], dict[str, str], Path]] = {
        "off": ({}, {}, ROOT),
        "on": (ON_ENV, ON_HEADERS, ROOT),
    }
    tree = baseline_tree(workdir)
    if tree is not None:
        variants["baseline"] = ({}, {}, tree)
    servers = {
        name: start_minivault(workdir, fake.url, name=f"gateway-{name}", env=env, code=code)
        for name, (env, _, code) in variants.items()
    }
    try:
        # The `on` server must really refuse a request without the key, or the comparison means nothing.
        refused = httpx.post(f"{servers['on'].url}/generate", content=generate_body).status_code
        if refused != 401:
            raise RuntimeError(f"the keyed server answered {refused} without a key")
        for name, served in servers.items():
            run_wrk(f"{served.url}/generate", generate_body, 16, 1, variants[name][1])
        rows: dict[str, list[float]] = {}
        names = list(servers)
        for round_index in range(rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            fake_p50 = run_wrk(f"{fake.url}/api/generate", fake_body, 1, seconds).p50_ms
            for name in order:
                served, headers = servers[name], variants[name][1]
                single = run_wrk(f"{served.url}/generate", generate_body, 1, seconds, headers)
                rows.setdefault(f"gw_{name}_added_p50_ms", []).append(single.p50_ms - fake_p50)
                before = served.cpu_seconds()
                loaded = run_wrk(f"{served.url}/generate", generate_body, 16, seconds, headers)
                cpu = served.cpu_seconds() - before
                rows.setdefault(f"gw_{name}_c16_cpu_ms", []).append(cpu / max(loaded.requests, 1) * 1000)
                rows.setdefault(f"gw_{name}_c16_rps", []).append(loaded.rps)
                rows.setdefault(f"gw_{name}_errors", []).append(single.errors + loaded.errors)
    finally:
        for served in servers.values():
            served.stop()
    results: dict[str, Any] = {key: statistics.median(values) for key, values in rows.items()}
    results["gw_baseline_rev"] = BASELINE_REV if tree is not None else None
    return results
