"""Run MiniVault's benchmark: `make bench`, or `python -m bench.run [--quick]`.

Starts the fake Ollama in its fast mode and MiniVault (one uvicorn worker, the Dockerfile's
command, interaction log on) on loopback, measures both in the same run, prints a markdown
table and writes bench/results/latest.json and latest.md.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from bench import clients, dialects, fleet, gateway, history, streams, vocabulary
from bench.procs import ROOT, Served, start_fake, start_minivault
from bench.wrk import run_wrk

RESULTS = ROOT / "bench" / "results"
GENERATE_BODY = json.dumps({"prompt": "tokens=16"})
FAKE_BODY = json.dumps({"model": "bench:latest", "prompt": "tokens=16", "stream": True})


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def latency(fake: Served, minivault: Served, rounds: int, seconds: float) -> dict[str, float]:
    """Concurrency 1, alternating fake and MiniVault rounds; added = MiniVault minus fake."""
    added_p50, added_p99, fake_p50 = [], [], []
    for _ in range(rounds):
        direct = run_wrk(f"{fake.url}/api/generate", FAKE_BODY, 1, seconds)
        proxied = run_wrk(f"{minivault.url}/generate", GENERATE_BODY, 1, seconds)
        fake_p50.append(direct.p50_ms)
        added_p50.append(proxied.p50_ms - direct.p50_ms)
        added_p99.append(proxied.p99_ms - direct.p99_ms)
    return {
        "fake_p50_ms": statistics.median(fake_p50),
        "added_p50_ms": statistics.median(added_p50),
        "added_p99_ms": statistics.median(added_p99),
    }


def throughput(fake: Served, minivault: Served, connections: int, rounds: int, seconds: float) -> dict[str, float]:
    """Requests/s and server CPU per request, fake and MiniVault alternating."""
    rows: dict[str, list[float]] = {"fake_rps": [], "fake_cpu_ms": [], "rps": [], "cpu_ms": [], "errors": []}
    for _ in range(rounds):
        for name, served, url, body in (("fake_", fake, f"{fake.url}/api/generate", FAKE_BODY),
                                        ("", minivault, f"{minivault.url}/generate", GENERATE_BODY)):  # fmt: skip
            before = served.cpu_seconds()
            result = run_wrk(url, body, connections, seconds)
            cpu = served.cpu_seconds() - before
            rows[f"{name}rps"].append(result.rps)
            rows[f"{name}cpu_ms"].append(cpu / max(result.requests, 1) * 1000)
            if not name:
                rows["errors"].append(result.errors)
    return {f"c{connections}_{key}": statistics.median(values) for key, values in rows.items()}


def check_log(path: Path) -> dict[str, Any]:
    lines = path.read_bytes().splitlines()
    ids, bad = set(), 0
    for line in lines:
        try:
            ids.add(json.loads(line)["id"])
        except (ValueError, KeyError):
            bad += 1
    return {"log_lines": len(lines), "log_bad_lines": bad, "log_unique_ids": len(ids)}


@dataclass(frozen=True)
class Plan:
    """How long and how many: `full` for the figures, `quick` to look, `smoke` to check the script runs."""

    seconds: int
    rounds: int
    streams: int
    ttft_runs: int
    relay_streams: int
    client_requests: int
    log_lines: int
    history_rows: int
    history_runs: int
    fleet_streams: int


PLANS = {
    "full": Plan(seconds=4, rounds=3, streams=500, ttft_runs=30, relay_streams=48, client_requests=3000,
                 log_lines=100_000, history_rows=1_000_000, history_runs=50, fleet_streams=200),
    "quick": Plan(seconds=2, rounds=1, streams=500, ttft_runs=10, relay_streams=16, client_requests=1000,
                  log_lines=20_000, history_rows=200_000, history_runs=50, fleet_streams=200),
    "smoke": Plan(seconds=1, rounds=1, streams=50, ttft_runs=3, relay_streams=8, client_requests=200, log_lines=5_000,
                  history_rows=20_000, history_runs=10, fleet_streams=40),
}  # fmt: skip


def run(plan: Plan) -> dict[str, Any]:
    seconds, rounds = plan.seconds, plan.rounds
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="minivault-bench-") as tmp:
        workdir = Path(tmp)
        fake = start_fake(workdir)
        minivault = start_minivault(workdir, fake.url)
        try:
            results["rss_idle_mb"] = minivault.memory_kib("VmRSS") / 1024
            say(f"{plan.streams} concurrent websocket streams (100 tokens each at 20 tokens/s), started over 1 s")
            runs = [uvloop.run(streams.many_websockets(minivault, plan.streams, 100, 50)) for _ in range(rounds)]
            results["rss_peak_mb"] = minivault.memory_kib("VmHWM") / 1024
            results |= {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            results["ws_stream_errors"] = sum(run["ws_stream_errors"] for run in runs)
            say("warm-up")
            run_wrk(f"{minivault.url}/generate", GENERATE_BODY, 16, 1)
            run_wrk(f"{fake.url}/api/generate", FAKE_BODY, 16, 1)
            say("added latency at concurrency 1")
            results |= latency(fake, minivault, rounds, seconds)
            for connections in (16, 64):
                say(f"throughput at concurrency {connections}")
                results |= throughput(fake, minivault, connections, rounds, seconds)
            say("OpenAI- and Ollama-compatible routes beside /generate: CPU per request at concurrency 16")
            results |= dialects.measure(minivault, 16, rounds, seconds)
            say("time to first token (256 tokens, 1 ms apart)")
            results |= uvloop.run(streams.time_to_first_token(fake, minivault, plan.ttft_runs))
            say("relay CPU per streamed token")
            results |= uvloop.run(streams.relay_cpu_per_token(minivault, plan.relay_streams, 8))
        finally:
            minivault.stop()
        results["one_worker_log"] = check_log(Path(minivault.extra["interactions"]))
        say("relay CPU per streamed chunk from an OpenAI-compatible upstream: text deltas vs a tool call's arguments")
        openai_env = {"MINIVAULT_BACKEND": "openai", "OPENAI_BASE_URL": fake.url, "OPENAI_MODEL": "bench:latest"}
        compat = start_minivault(workdir, fake.url, name="openai-compat", env=openai_env)
        try:
            results |= uvloop.run(streams.relay_cpu_per_chunk_openai(compat, plan.relay_streams, 8))
        finally:
            compat.stop()
        say(f"plain text now vs {vocabulary.VOCABULARY_REV} (before issue 16): CPU per request at concurrency 16")
        results |= vocabulary.measure(fake, workdir, rounds, seconds)
        say("gateway features on (key, limits, metrics, issue 15's guards) vs off, plain httptools, older versions")
        results |= gateway.measure(fake, workdir, rounds, seconds, GENERATE_BODY, FAKE_BODY)
        say(f"history database: {plan.history_rows:,} exchanges, then searches, filters and stats on it")
        history_db = workdir / "history.db"
        results |= history.measure_database(history_db, plan.history_rows, plan.history_runs, plan.log_lines)
        say(f"history on (writing into those {plan.history_rows:,}) vs off: CPU per request at concurrency 16")
        results |= history.measure_request_cost(fake, workdir, 2 * rounds, seconds, GENERATE_BODY, history_db)
        say("upstream HTTP clients alone")
        results |= clients.run(fake.url, plan.client_requests)
        say("two workers")
        two = start_minivault(workdir, fake.url, workers=2, name="two-workers")
        try:
            run_wrk(f"{two.url}/generate", GENERATE_BODY, 16, 1)
            for connections in (16, 64):
                result = run_wrk(f"{two.url}/generate", GENERATE_BODY, connections, seconds)
                results[f"workers2_c{connections}_rps"] = result.rps
                results[f"workers2_c{connections}_errors"] = result.errors
        finally:
            two.stop()
            fake.stop()
        results["two_worker_log"] = check_log(Path(two.extra["interactions"]))
        say(f"fleet: 4 hosts of different speeds, {plan.fleet_streams} streams, least_busy vs random vs round_robin")
        results |= fleet.measure(workdir, plan.fleet_streams, rounds)
        say("interaction log writer alone")
        writes = []
        for _ in range(rounds):
            command = [sys.executable, "-m", "bench.logwriter", str(workdir), str(plan.log_lines)]
            output = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            writes.append(json.loads(output))
            for leftover in workdir.glob("*.jsonl"):
                leftover.unlink()
        results |= {key: statistics.median(run[key] for run in writes) for key in writes[0]}
    return results


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def table(r: dict[str, Any]) -> str:
    rows = [
        ("Added latency, concurrency 1, median", f"{r['added_p50_ms']:.2f} ms", f"fake alone {r['fake_p50_ms']:.2f} ms",
         "≤ 0.8 ms", r["added_p50_ms"] <= 0.8),
        ("Added latency, concurrency 1, p99", f"{r['added_p99_ms']:.2f} ms", "", "≤ 2 ms", r["added_p99_ms"] <= 2),
        ("Requests/s, concurrency 16", f"{r['c16_rps']:,.0f}", f"fake alone {r['c16_fake_rps']:,.0f}",
         "≥ 1,000", r["c16_rps"] >= 1000),
        ("CPU per request, concurrency 16", f"{r['c16_cpu_ms']:.2f} ms", f"fake alone {r['c16_fake_cpu_ms']:.3f} ms",
         "≤ 1.0 ms", r["c16_cpu_ms"] <= 1.0),
        ("Requests/s, concurrency 64", f"{r['c64_rps']:,.0f}", f"fake alone {r['c64_fake_rps']:,.0f}", "", None),
        ("CPU per request, concurrency 64", f"{r['c64_cpu_ms']:.2f} ms", f"fake alone {r['c64_fake_cpu_ms']:.3f} ms",
         "≤ 1.0 ms", r["c64_cpu_ms"] <= 1.0),
        ("Upstream client CPU per streamed request (httpx over aiohttp, shipped)",
         f"{r['client_httpx_aiohttp_us']:.0f} µs",
         f"aiohttp alone {r['client_aiohttp_us']:.0f} µs; httpx's own transport {r['client_httpx_httpx_us']:.0f} µs",
         "", None),
        ("Time to first token added, SSE", f"{r['sse_ttft_added_ms']:.2f} ms", f"fake alone {r['fake_ttft_ms']:.2f} ms",
         "≤ 1 ms", r["sse_ttft_added_ms"] <= 1),
        ("Time to first token added, websocket", f"{r['ws_ttft_added_ms']:.2f} ms", "", "≤ 1 ms",
         r["ws_ttft_added_ms"] <= 1),
        ("Relay CPU per token, SSE", f"{r['sse_relay_us_per_token']:.1f} µs", "", "≤ 30 µs",
         r["sse_relay_us_per_token"] <= 30),
        ("Relay CPU per token, websocket", f"{r['ws_relay_us_per_token']:.1f} µs", "", "≤ 30 µs",
         r["ws_relay_us_per_token"] <= 30),
        ("Relay CPU per chunk of a streamed tool call (OpenAI-compatible upstream, /v1 streamed)",
         f"{r['openai_tool_call_relay_us_per_chunk']:.1f} µs",
         f"text deltas on the same path {r['openai_text_relay_us_per_chunk']:.1f} µs", "≤ 1.10× text",
         r["openai_tool_call_relay_us_per_chunk"] <= 1.10 * r["openai_text_relay_us_per_chunk"]),
        (f"{r['ws_streams']} websocket streams: errors", f"{r['ws_stream_errors']}",
         f"{r['ws_tokens_received']:,.0f} tokens received",
         "0", r["ws_stream_errors"] == 0),
        (f"{r['ws_streams']} websocket streams: token delay p99", f"{r['ws_token_delay_p99_ms']:.1f} ms",
         f"p50 {r['ws_token_delay_p50_ms']:.1f} ms", "≤ 20 ms", r["ws_token_delay_p99_ms"] <= 20),
        (f"RSS idle / peak under {r['ws_streams']} streams", f"{r['rss_idle_mb']:.0f} / {r['rss_peak_mb']:.0f} MB", "",
         "≤ 150 MB", r["rss_peak_mb"] <= 150),
        ("Log writer lines/s", f"{r['writer_lines_per_s']:,.0f}",
         f"write+flush on the loop {r['naive_lines_per_s']:,.0f}", "≥ 20,000", r["writer_lines_per_s"] >= 20000),
        ("Event-loop lag while logging, max (p99)",
         f"{r['writer_loop_lag_max_ms']:.2f} ms ({r['writer_loop_lag_p99_ms']:.2f})",
         f"write+flush on the loop {r['naive_loop_lag_max_ms']:.2f} ms", "< 5 ms", r["writer_loop_lag_max_ms"] < 5),
        ("2 workers: requests/s, concurrency 16", f"{r['workers2_c16_rps']:,.0f}",
         f"{r['workers2_c16_rps'] / r['c16_rps']:.2f}× one worker", "", None),
        ("2 workers: requests/s, concurrency 64", f"{r['workers2_c64_rps']:,.0f}",
         f"{r['workers2_c64_rps'] / r['c64_rps']:.2f}× one worker", "", None),
        *gateway_rows(r),
        *guard_rows(r),
        *history_rows(r),
        *dialect_rows(r),
        *vocabulary.rows(r),
        *fleet_rows(r),
        ("2 workers: log lines, all valid and unique", f"{r['two_worker_log']['log_lines']:,}",
         f"{r['two_worker_log']['log_bad_lines']} bad, {r['two_worker_log']['log_unique_ids']:,} unique ids", "",
         r["two_worker_log"]["log_bad_lines"] == 0
         and r["two_worker_log"]["log_unique_ids"] == r["two_worker_log"]["log_lines"]),
    ]  # fmt: skip
    lines = ["| measure | MiniVault | same run, for comparison | target | |", "|---|---|---|---|---|"]
    for name, value, baseline, target, ok in rows:
        lines.append(f"| {name} | {value} | {baseline} | {target} | {'' if ok is None else verdict(ok)} |")
    return "\n".join(lines)


def dialect_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """The OpenAI and Ollama routes against /generate answering the same way, in the same server and run."""
    rows = []
    for name, label in (("openai", "OpenAI /v1/chat/completions"), ("ollama", "Ollama /api/generate")):
        plain, stream = r[f"dialect_{name}_ratio"], r[f"dialect_{name}_stream_ratio"]
        streamed = "/v1/chat/completions" if name == "openai" else "/api/chat"
        rows.append((
            f"{label}: CPU per request, concurrency 16 (JSON; streamed {streamed})",
            f"{r[f'dialect_{name}_cpu_ms']:.2f} ms; {r[f'dialect_{name}_stream_cpu_ms']:.2f} ms",
            f"/generate {r['dialect_native_cpu_ms']:.2f} ms, {plain:.2f}×; "
            f"streamed {r['dialect_native_stream_cpu_ms']:.2f} ms, {stream:.2f}×",
            "≤ 1.15× /generate", max(plain, stream) <= 1.15 and r["dialect_errors"] == 0,
        ))  # fmt: skip
    return rows


def fleet_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """Four hosts of different speeds: each strategy's latency and where its streams went, then the issue's bound."""
    hosts = f"4 hosts at {'/'.join(str(ms) for ms in r['fleet_intervals_ms'])} ms per token"
    capacity = "/".join(f"{pct:.0f}" for pct in r["fleet_capacity_pct"])
    rows: list[tuple[str, str, str, str, bool | None]] = []
    for strategy in fleet.STRATEGIES:
        prefix = f"fleet_{strategy}_"
        f = {key[len(prefix) :]: value for key, value in r.items() if key.startswith(prefix)}
        rows.append((
            f"Fleet, {hosts}, {r['fleet_streams']} streams of {r['fleet_tokens']} tokens, {strategy}: "
            "first token / total, p50 (p99)",
            f"{f['ttft_p50_ms']:.1f} ({f['ttft_p99_ms']:.1f}) / {f['total_p50_ms']:.0f} ({f['total_p99_ms']:.0f}) ms",
            f"hosts served {'/'.join(f'{pct:.0f}' for pct in f['served_pct'])} % (speed share {capacity} %), "
            f"max deviation {f['share_deviation_pp']:.0f} points; mean total {f['total_mean_ms']:.0f} ms; "
            f"{f['errors']} errors", "0 errors", f["errors"] == 0,
        ))  # fmt: skip
    best, rivals = r["fleet_least_busy_total_p99_ms"], [r[f"fleet_{s}_total_p99_ms"] for s in ("random", "round_robin")]
    rows.append((
        f"Fleet, {r['fleet_streams']} streams: total time p99, least_busy", f"{best:.0f} ms",
        f"random {rivals[0]:.0f} ms, round_robin {rivals[1]:.0f} ms", "least_busy p99 < random and < round_robin",
        all(best < rival for rival in rivals),
    ))  # fmt: skip
    return rows


def gateway_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """Features on vs off (and vs the version before them): the bounds the gateway issue sets."""
    on_latency, off_latency = r["gw_on_added_p50_ms"], r["gw_off_added_p50_ms"]
    baseline = ""
    if r.get("gw_baseline_rev"):
        baseline = (f"; {r['gw_baseline_rev']} (before the features) {r['gw_baseline_added_p50_ms']:.2f} ms, "
                    f"{on_latency / r['gw_baseline_added_p50_ms']:.2f}×")  # fmt: skip
    cpu_baseline = ""
    if r.get("gw_baseline_rev"):
        cpu_baseline = (f"; {r['gw_baseline_rev']} {r['gw_baseline_c16_cpu_ms']:.2f} ms, "
                        f"{r['gw_on_c16_cpu_ms'] / r['gw_baseline_c16_cpu_ms']:.2f}×")  # fmt: skip
    return [
        ("Gateway features on: added latency, concurrency 1, median", f"{on_latency:.2f} ms",
         f"features off {off_latency:.2f} ms, {on_latency / off_latency:.2f}×{baseline}", "≤ 1.10× off",
         on_latency <= off_latency * 1.10),
        ("Gateway features on: CPU per request, concurrency 16", f"{r['gw_on_c16_cpu_ms']:.2f} ms",
         f"features off {r['gw_off_c16_cpu_ms']:.2f} ms, {r['gw_on_c16_cpu_ms'] / r['gw_off_c16_cpu_ms']:.2f}×"
         f"{cpu_baseline}", "≤ 1.0 ms", r["gw_on_c16_cpu_ms"] <= 1.0),
    ]  # fmt: skip


def guard_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """Issue 15's Speed bounds: everything it turned on against the commit before it, and the guards alone."""
    on_cpu, on_latency = r["gw_on_c16_cpu_ms"], r["gw_on_added_p50_ms"]
    plain_cpu, plain_latency = r["gw_plain_c16_cpu_ms"], r["gw_plain_added_p50_ms"]
    guards = ("Connection guards alone (key and limits on): CPU per request, concurrency 16; added latency, "
              "concurrency 1", f"{on_cpu:.2f} ms; {on_latency:.2f} ms",
              f"plain httptools {plain_cpu:.2f} ms, {on_cpu / plain_cpu:.2f}×; {plain_latency:.2f} ms, "
              f"{on_latency / plain_latency:.2f}×", "", None)  # fmt: skip
    rev = r.get("gw_previous_rev")
    if not rev:
        missing = ("git cannot provide the commit before issue 15", "", "", None)
        return [("Issue 15 on: CPU per request, concurrency 16", *missing),
                ("Issue 15 on: added latency, concurrency 1, median", *missing), guards]  # fmt: skip
    before_cpu, before_latency = r["gw_previous_c16_cpu_ms"], r["gw_previous_added_p50_ms"]
    return [
        ("Issue 15 on (host, origin and connection guards, per-key scoping; key and limits on): CPU per request, "
         "concurrency 16", f"{on_cpu:.2f} ms", f"{rev} (before issue 15) {before_cpu:.2f} ms, "
         f"{on_cpu / before_cpu:.2f}×", f"≤ 1.0 ms and ≤ 1.10× {rev}",
         on_cpu <= 1.0 and on_cpu <= before_cpu * 1.10),
        ("Issue 15 on: added latency, concurrency 1, median", f"{on_latency:.2f} ms",
         f"{rev} {before_latency:.2f} ms, {on_latency / before_latency:.2f}×", f"≤ 1.10× {rev}",
         on_latency <= before_latency * 1.10),
        guards,
    ]  # fmt: skip


def history_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """The history issue's bounds: searches on a large database, and writing it costs the request path nothing."""
    rows = f"{r['generate_rows']:,} exchanges"
    on, off = r["history_on_c16_cpu_ms"], r["history_off_c16_cpu_ms"]  # medians over the rounds
    return [
        (f"History: {rows} generated", f"{r['generate_s']:.0f} s", f"{r['db_mb']:,.0f} MB on disk", "", None),
        (f"History, {rows}: full-text search page, median (p99)",
         f"{r['history_search_p50_ms']:.1f} ms ({r['history_search_p99_ms']:.1f})",
         f"second page {r['history_search_page2_p50_ms']:.1f} ms ({r['history_search_page2_p99_ms']:.1f}); "
         f"{r['history_search_matches_median']:,.0f} matches (median); a word in every exchange "
         f"{r['history_search_broad_p50_ms']:.1f} ms", "< 50 ms",
         max(r["history_search_p99_ms"], r["history_search_page2_p99_ms"]) < 50),
        (f"History, {rows}: filtered page, median (p99)",
         f"{r['history_filtered_p50_ms']:.2f} ms ({r['history_filtered_p99_ms']:.2f})", "", "< 50 ms",
         r["history_filtered_p99_ms"] < 50),
        (f"History, {rows}: stats, median (p99)",
         f"{r['history_stats_p50_ms']:.1f} ms ({r['history_stats_p99_ms']:.1f})",
         f"last 7 days {r['history_stats_week_p50_ms']:.1f} ms", "< 200 ms", r["history_stats_p99_ms"] < 200),
        ("History writer, exchanges/s", f"{r['history_writer_per_s']:,.0f}", "", "≥ 2,000",
         r["history_writer_per_s"] >= 2000),
        (f"History on (into {rows}): CPU per request, concurrency 16", f"{on:.2f} ms",
         f"history off {off:.2f} ms; {r['history_on_off_cpu_ratio']:.2f}× (median of per-round ratios); "
         f"{r['history_on_rows']:,} rows for {r['history_on_log_lines']:,} log lines", "≤ 1.10× off",
         r["history_on_off_cpu_ratio"] <= 1.10 and r["history_on_rows"] == r["history_on_log_lines"]),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="MiniVault benchmark")
    parser.add_argument("--quick", action="store_true", help="one short round of each measurement")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks the benchmark runs, figures mean little"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where latest.json and latest.md go")
    args = parser.parse_args()
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    started = time.monotonic()
    results = run(PLANS[name])
    results["meta"] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "make bench" + ("" if name == "full" else f" ARGS=--{name}"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "seconds": round(time.monotonic() - started, 1),
    }
    markdown = table(results)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    meta = results["meta"]
    header = (f"Measured {meta['date']} with `{meta['command']}` ({meta['machine']}, Python {meta['python']}, "
              f"{meta['seconds']:.0f} s).")  # fmt: skip
    (args.output / "latest.md").write_text(header + "\n\n" + markdown + "\n")
    print(header + "\n\n" + markdown)


if __name__ == "__main__":
    main()
