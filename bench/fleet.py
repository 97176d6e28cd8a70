"""Routing across several hosts: four fast fakes of different speeds behind one MiniVault per strategy
(`least_busy`, MiniVault's default; `random`, what Open WebUI does with several Ollama URLs; `round_robin`),
all started once and measured in the same run, rounds rotating the order of the strategies.

Each round opens the streams' websockets at once and sends their prompts 5 ms apart (200 over a second,
as `streams.many_websockets` spreads its starts, at any size); each stream's time to first token and
total time are taken at the client, and which host served it from MiniVault's log (`upstream`),
against each host's speed share.
Run alone with `python -m bench.fleet [--smoke|--quick]`.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
import orjson
import uvloop
from websockets.asyncio.client import connect

from bench.procs import Served, start_fake, start_minivault
from bench.streams import prompt

STRATEGIES = ("least_busy", "random", "round_robin")
# The prompt asks every host for 2 ms between tokens; each host multiplies it: 2, 4, 8 and 16 ms.
SLOWDOWNS = (1, 2, 4, 8)
# Each host generates 4 answers at once and queues the rest, as Ollama does (OLLAMA_NUM_PARALLEL, 4 where
# memory allows): a host's capacity is its speed times its slots. With no bound, a fake host would stream
# any number of answers at full speed, every strategy's p99 would be the slowest host's stream time, and
# the strategies would tie on it (measured: 498-502 ms each).
HOST_PARALLEL = 4
TOKENS, INTERVAL_MS = 32, 2
WARM_UP = 8
START_GAP = 0.005  # seconds between two prompts: the same arrival rate at every plan size
# MiniVault's own admission must not decide where the time goes: 64 slots per host, and room to queue.
FLEET_LIMITS = {"MINIVAULT_MAX_CONCURRENCY": "256", "MINIVAULT_MAX_QUEUE": "1024"}


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)] if ordered else float("nan")


async def timed_streams(minivault: Served, count: int) -> tuple[list[float], list[float], int]:
    """`count` websocket streams of TOKENS tokens: seconds to the first token and to the end of each, and errors."""
    url = f"ws://127.0.0.1:{minivault.port}/ws/generate"
    message = json.dumps({"prompt": prompt(TOKENS, INTERVAL_MS)})
    firsts: list[float] = []
    totals: list[float] = []
    errors = 0
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
                await asyncio.sleep(START_GAP * index)
                started = time.perf_counter()
                await ws.send(message)
                received, first = 0, None
                while True:
                    frame = orjson.loads(await ws.recv(decode=False))
                    if frame["type"] == "token":
                        if first is None:
                            first = time.perf_counter() - started
                        received += 1
                    elif frame["type"] in ("done", "error"):
                        if frame["type"] == "error" or received != TOKENS or first is None:
                            errors += 1
                        else:
                            firsts.append(first)
                            totals.append(time.perf_counter() - started)
                        return
        except Exception:  # noqa: BLE001 - a benchmark counts failures instead of stopping
            errors += 1
            everyone_ready.set()

    await asyncio.gather(*(one(index) for index in range(count)))
    return firsts, totals, errors


async def warm_up(servers: Iterable[Served]) -> None:
    """A few streams through each server (upstream connections, first-request paths), all at once."""
    await asyncio.gather(*(timed_streams(server, WARM_UP) for server in servers))


def served_by(log: Path, skip: int, count: int, timeout: float = 15.0) -> Counter[str]:
    """The `upstream` of log lines skip..skip+count, once the writer has flushed them (it writes off the loop)."""
    deadline = time.monotonic() + timeout
    lines = log.read_bytes().splitlines()
    while len(lines) < skip + count and time.monotonic() < deadline:
        time.sleep(0.05)
        lines = log.read_bytes().splitlines()
    return Counter(str(json.loads(line).get("upstream")) for line in lines[skip : skip + count])


def start_servers(workdir: Path, fakes: list[Served], servers: dict[str, Served]) -> None:
    """One MiniVault per strategy in front of the same hosts, started side by side into `servers` (so that the
    caller stops whichever started); each must see every host up before it is measured."""
    urls = ",".join(fake.url for fake in fakes)

    def start(strategy: str) -> None:
        env = {"OLLAMA_BASE_URLS": urls, "MINIVAULT_ROUTING": strategy, **FLEET_LIMITS}
        servers[strategy] = start_minivault(workdir, fakes[0].url, name=f"fleet-{strategy}", env=env)

    with ThreadPoolExecutor(len(STRATEGIES)) as pool:
        list(pool.map(start, STRATEGIES))
    for strategy, server in servers.items():
        states = [host["state"] for host in httpx.get(f"{server.url}/health").json().get("hosts", [])]
        if states != ["ok"] * len(fakes):
            raise RuntimeError(f"{strategy}: the fleet is not all up: {states}")


def measure(workdir: Path, count: int, rounds: int) -> dict[str, Any]:
    """Per strategy: median over rounds of p50/p99 TTFT and total, errors, and the hosts' shares of the streams."""
    fakes = [start_fake(workdir, name=f"fleet-host{index}", slowdown=slow, parallel=HOST_PARALLEL)
             for index, slow in enumerate(SLOWDOWNS)]  # fmt: skip
    servers: dict[str, Served] = {}
    runs: dict[str, list[tuple[list[float], list[float], int]]] = {strategy: [] for strategy in STRATEGIES}
    hosts: dict[str, Counter[str]] = {strategy: Counter() for strategy in STRATEGIES}
    try:
        start_servers(workdir, fakes, servers)
        uvloop.run(warm_up(servers.values()))
        logged = {name: sum(served_by(Path(server.extra["interactions"]), 0, WARM_UP).values())
                  for name, server in servers.items()}  # fmt: skip
        for index in range(rounds):
            shift = index % len(STRATEGIES)
            for strategy in STRATEGIES[shift:] + STRATEGIES[:shift]:
                server = servers[strategy]
                runs[strategy].append(uvloop.run(timed_streams(server, count)))
                hosts[strategy] += served_by(Path(server.extra["interactions"]), logged[strategy], count)
                logged[strategy] += count
    finally:
        for served in [*servers.values(), *fakes]:
            served.stop()
    speed = [1 / slow for slow in SLOWDOWNS]
    capacity = [100 * s / sum(speed) for s in speed]
    results: dict[str, Any] = {
        "fleet_streams": count,
        "fleet_rounds": rounds,
        "fleet_tokens": TOKENS,
        "fleet_intervals_ms": [INTERVAL_MS * slow for slow in SLOWDOWNS],
        "fleet_capacity_pct": capacity,
    }
    for strategy in STRATEGIES:
        rows = runs[strategy]
        figures = {
            "ttft_p50_ms": [percentile(firsts, 0.5) * 1000 for firsts, _, _ in rows],
            "ttft_p99_ms": [percentile(firsts, 0.99) * 1000 for firsts, _, _ in rows],
            "total_p50_ms": [percentile(totals, 0.5) * 1000 for _, totals, _ in rows],
            "total_p99_ms": [percentile(totals, 0.99) * 1000 for _, totals, _ in rows],
            "total_mean_ms": [statistics.fmean(totals) * 1000 if totals else float("nan") for _, totals, _ in rows],
        }
        results |= {f"fleet_{strategy}_{key}": statistics.median(values) for key, values in figures.items()}
        results[f"fleet_{strategy}_errors"] = sum(errors for _, _, errors in rows)
        served = sum(hosts[strategy].values())
        shares = [100 * hosts[strategy][fake.url] / max(served, 1) for fake in fakes]
        results[f"fleet_{strategy}_served_pct"] = shares
        results[f"fleet_{strategy}_logged"] = served
        results[f"fleet_{strategy}_share_deviation_pp"] = max(abs(s - c) for s, c in zip(shares, capacity, strict=True))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="MiniVault's fleet benchmark alone")
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the measurement runs")
    args = parser.parse_args()
    from bench.run import PLANS, fleet_rows, verdict  # bench.run imports this module: only when run alone

    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    with TemporaryDirectory(prefix="minivault-fleet-") as tmp:
        say(f"fleet: {plan.fleet_streams} streams per strategy, {plan.rounds} round(s)")
        results = measure(Path(tmp), plan.fleet_streams, plan.rounds)
    print(json.dumps(results, indent=2))
    print("| measure | MiniVault | same run, for comparison | target | |\n|---|---|---|---|---|")
    for name, value, baseline, target, ok in fleet_rows(results):
        print(f"| {name} | {value} | {baseline} | {target} | {'' if ok is None else verdict(ok)} |")


if __name__ == "__main__":
    main()
