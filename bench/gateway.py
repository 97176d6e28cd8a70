"""What the gateway features cost on the hot path, all measured in one run against the same fake:

- `on`: API key required (and sent), admission limits on (16 slots, queue 64), metrics on, and what issue 15
  turned on by default: host and origin checks, per-key scoping, the connection guards (the Dockerfile's
  `--http app.web.connections:GuardedProtocol`);
- `off`: the same code with no keys and limits too wide to matter (metrics cannot be turned off);
- `plain`: `on` served by uvicorn's plain httptools protocol: what the connection guards cost alone;
- `baseline`: the version before these features (BASELINE_REV), when git can provide its tree;
- `previous`: the commit before issue 15 (PREVIOUS_REV) with `on`'s key and limits, run as it shipped.
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
# The commit before issue 15 (safe by default: host, origin and connection guards, per-key scoping): its
# Speed section bounds `on` against this one, measured in the same run.
PREVIOUS_REV = "620fb0c"
KEY = "bench-key"
ON_ENV = {"MINIVAULT_API_KEYS": KEY, "MINIVAULT_MAX_CONCURRENCY": "16", "MINIVAULT_MAX_QUEUE": "64"}
ON_HEADERS = {"Authorization": f"Bearer {KEY}"}


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def baseline_tree(workdir: Path, rev: str = BASELINE_REV, name: str = "baseline") -> Path | None:
    """`rev`'s files, unpacked from git; None (and why) when the clone lacks that commit."""
    target = workdir / name
    target.mkdir(exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        say(f"no {name}: git cannot provide {rev} ({archive.stderr.decode().strip()})")
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def measure(fake: Served, workdir: Path, rounds: int, seconds: float, generate_body: str, fake_body: str
            ) -> dict[str, Any]:  # fmt: skip
    """Added latency at concurrency 1 and CPU per request at concurrency 16, per variant."""
    # name: (environment, request headers, code tree, uvicorn protocol in place of the CMD's)
    variants: dict[str, tuple[dict[str, str], dict[str, str], Path, str | None]] = {
        "off": ({}, {}, ROOT, None),
        "on": (ON_ENV, ON_HEADERS, ROOT, None),
        "plain": (ON_ENV, ON_HEADERS, ROOT, "httptools"),
    }
    tree = baseline_tree(workdir)
    if tree is not None:
        variants["baseline"] = ({}, {}, tree, None)
    previous = baseline_tree(workdir, PREVIOUS_REV, "previous")
    if previous is not None:
        variants["previous"] = (ON_ENV, ON_HEADERS, previous, None)
    servers = {
        name: start_minivault(workdir, fake.url, name=f"gateway-{name}", env=env, code=code, http=http)
        for name, (env, _, code, http) in variants.items()
    }
    try:
        # The keyed servers must really refuse a request without the key, and `on` run the connection guards
        # (`plain` not), or the comparison means nothing.
        for name in ("on", "plain", "previous"):
            if name in servers:
                refused = httpx.post(f"{servers[name].url}/generate", content=generate_body,
                                     headers={"Content-Type": "application/json"}).status_code  # fmt: skip
                if refused != 401:
                    raise RuntimeError(f"the keyed server {name!r} answered {refused} without a key")
        for name, guards in (("on", "connection guards on"), ("plain", "connection guards are off")):
            if guards not in servers[name].log.read_text():
                raise RuntimeError(f"the {name!r} server's log does not say {guards!r}")
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
    results["gw_previous_rev"] = PREVIOUS_REV if previous is not None else None
    return results
