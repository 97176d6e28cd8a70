"""The history database at scale, and what writing it costs the request path.

- `generate`: N exchanges (1,000,000 in `make bench`) into a fresh database, through the store's own
  insert (50,000 rows per transaction). Prompts and answers are drawn from a 400-word English
  vocabulary with Zipf frequencies plus topic phrases, so full-text queries have real posting lists.
- `queries`: a full-text page, a filtered page and the per-day stats, each run the way the route runs
  it (the store's async methods, so in a worker thread), median and p99 over many runs.
- `writer`: the writer thread's sustained rate: exchanges consumed on the event loop as fast as it
  goes, timed until the last is committed.
- `measure_request_cost`: CPU per request at concurrency 16, MiniVault with history on (the shipped
  app) against the same code with the history store replaced by one that drops every record
  (bench/history_off.py), both served as the Dockerfile serves them, in the same run.

`python -m bench.history DB ROWS RUNS WRITER_RECORDS` prints the figures of the first three as JSON
(bench/run.py runs it so, in a process of its own, then has the `on` server write into that database).
"""

import asyncio
import gc
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from app.schemas import ExchangeRecord
from app.store.base import HistoryQuery
from app.store.sqlite_history import SqliteHistory, fts_query, row_of
from bench.procs import ROOT, Served, start_minivault
from bench.wrk import run_wrk

# Common words first (Zipf: the n-th is drawn with weight 1/n), then topic words, rarer.
_COMMON = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down side "
    "been now find any new work part take get place made live where after back little only round man year came "
    "show every good me give our under name very through just form sentence great think say help low line differ "
    "turn cause much mean before move right boy old too same tell does set three want air well also play small end "
    "put home read hand port large spell add even land here must big high such follow act why ask men change went "
    "light kind off need house picture try us again animal point mother world near build self earth father head "
    "stand own page should country found answer school grow study still learn plant cover food sun four between "
    "state keep eye never last let thought city tree cross farm hard start might story saw far sea draw left late "
    "run while press close night real life few north open seem together next white children begin got walk example "
    "ease paper group always music those both mark often letter until mile river car feet care second book carry "
    "took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face wood "
    "main enough plain girl usual young ready above ever red list though feel talk bird soon body dog family direct"
).split()
_TOPICS = (
    "gravity photosynthesis electron galaxy planet orbit quantum molecule protein enzyme algorithm database "
    "network compiler function variable recursion theorem equation derivative integral matrix vector probability "
    "volcano glacier climate ocean forest desert mitochondria chlorophyll telescope satellite rocket engine battery "
    "circuit voltage magnet neutron photon spectrum entropy energy momentum velocity acceleration friction pressure"
).split()
_PHRASES = (
    "black hole", "speed of light", "neural network", "natural selection", "carbon dioxide", "solar system",
    "machine learning", "binary search", "hash table", "climate change", "plate tectonics", "dark matter",
)  # fmt: skip
MODELS = (("tinyllama:1.1b-chat", 60), ("qwen2:0.5b", 25), ("llama3.2:3b", 10), ("smollm2:135m", 5))
STATUSES = (("ok", 95), ("error", 3), ("cancelled", 2))
ENDPOINTS = (("rest", 50), ("sse", 35), ("ws", 15))
DAYS = 100
GENERATE_CHUNK = 50_000


def _texts(rng: random.Random, count: int, words: tuple[int, int]) -> list[str]:
    vocabulary = _COMMON + _TOPICS
    weights = [1 / (rank + 1) for rank in range(len(_COMMON))] + [0.002] * len(_TOPICS)
    texts = []
    for _ in range(count):
        chosen = rng.choices(vocabulary, weights, k=rng.randint(*words))
        if rng.random() < 0.05:
            chosen.insert(rng.randrange(len(chosen) + 1), rng.choice(_PHRASES))
        texts.append(" ".join(chosen))
    return texts


def _pick(rng: random.Random, table: tuple[tuple[str, int], ...], count: int) -> list[str]:
    return rng.choices([name for name, _ in table], [weight for _, weight in table], k=count)


def generate(store: SqliteHistory, rows: int, seed: int = 1) -> dict[str, float]:
    """`rows` exchanges spread evenly over the DAYS days before now, oldest first (as a server writes them)."""
    rng = random.Random(seed)
    started = time.perf_counter()
    prompts = _texts(rng, 20_000, (4, 14))
    answers = _texts(rng, 20_000, (12, 40))
    end = datetime.now(UTC).replace(microsecond=0)
    step = timedelta(days=DAYS) / rows
    first = end - timedelta(days=DAYS)
    for start in range(0, rows, GENERATE_CHUNK):
        count = min(GENERATE_CHUNK, rows - start)
        models = _pick(rng, MODELS, count)
        statuses = _pick(rng, STATUSES, count)
        endpoints = _pick(rng, ENDPOINTS, count)
        batch = []
        for index in range(count):
            prompt, answer = rng.choice(prompts), rng.choice(answers)
            status = statuses[index]
            latency = rng.lognormvariate(6.5, 0.6)  # median ~665 ms
            record = ExchangeRecord(
                id=uuid.UUID(int=rng.getrandbits(128)).hex,
                ts=(first + step * (start + index)).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                endpoint=endpoints[index],  # type: ignore[arg-type]
                client="127.0.0.1:50000", backend="ollama", model=models[index], prompt=prompt, system=None,
                options={"temperature": 0.2} if index % 4 == 0 else None, response=answer,
                prompt_chars=len(prompt), response_chars=len(answer), status=status,  # type: ignore[arg-type]
                error=None, done_reason="stop" if status == "ok" else None,
                prompt_tokens=len(prompt) // 4, completion_tokens=len(answer) // 4,
                queue_ms=None, ttft_ms=latency / 8, latency_ms=round(latency, 1),
            )  # fmt: skip
            batch.append(row_of(record))
        store.insert_rows(batch)
    elapsed = time.perf_counter() - started
    return {"generate_rows": rows, "generate_s": elapsed, "db_mb": _size_mb(store.path)}


def _size_mb(path: Path) -> float:
    return sum(file.stat().st_size for file in path.parent.glob(path.name + "*")) / 1e6


# Full-text queries of each kind the API takes: words, prefixes, phrases, and mixes of them.
SEARCHES = (
    "gravity", "photosynthesis", "quantum", "phot*", "electr*", "volcan*", '"black hole"', '"speed of light"',
    '"neural network"', "enzyme*", "recurs*", "gravity water", "energy light", "galaxy orbit",
    "telescope satellite", "derivative integral", "glacier climate", "water",
)  # fmt: skip
# A word in nearly every exchange: ranking is bounded by windows of 5,000 matches (informational figure).
BROAD = "the"


async def _timed(runs: int, make: Callable[[int], Awaitable[Any]]) -> list[float]:
    times = []
    for index in range(runs):
        started = time.perf_counter()
        await make(index)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)


def _p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


async def queries(store: SqliteHistory, runs: int) -> dict[str, float]:
    """Each query as GET /history runs it: the store's async method, in a worker thread."""
    results: dict[str, float] = {}
    week_ago = datetime.now(UTC) - timedelta(days=7)
    matches = []
    for q in SEARCHES:  # warm the page cache once, and count what each query matches
        matches.append(store.read(lambda db, q=q: _match_count(db, q)))
        await store.search(HistoryQuery(q=q))
    search = await _timed(runs, lambda i: store.search(HistoryQuery(q=SEARCHES[i % len(SEARCHES)], limit=50)))
    pages = await _second_pages(store)
    second = await _timed(runs, lambda i: store.search(pages[i % len(pages)]))
    filters = [
        HistoryQuery(model="qwen2:0.5b", status="error"),
        HistoryQuery(model="llama3.2:3b", endpoint="ws", since=week_ago),
        HistoryQuery(status="cancelled", endpoint="sse"),
        HistoryQuery(model="smollm2:135m", until=week_ago),
    ]
    for query in filters:
        await store.search(query)
    filtered = await _timed(runs, lambda i: store.search(filters[i % len(filters)]))
    broad = await _timed(max(5, runs // 5), lambda i: store.search(HistoryQuery(q=BROAD)))
    await store.stats()
    stats = await _timed(max(5, runs // 5), lambda i: store.stats())
    stats_week = await _timed(max(5, runs // 5), lambda i: store.stats(since=week_ago))
    for name, times in (("search", search), ("search_page2", second), ("search_broad", broad),
                        ("filtered", filtered), ("stats", stats), ("stats_week", stats_week)):  # fmt: skip
        results[f"history_{name}_p50_ms"] = statistics.median(times)
        results[f"history_{name}_p99_ms"] = _p99(times)
    results["history_search_matches_median"] = statistics.median(matches)
    results["history_search_matches_max"] = max(matches)
    return results


def _match_count(db: sqlite3.Connection, q: str) -> int:
    return db.execute("SELECT count(*) FROM exchanges_text WHERE exchanges_text MATCH ?", (fts_query(q),)).fetchone()[0]


async def _second_pages(store: SqliteHistory) -> list[HistoryQuery]:
    """The second page of each search that has one (at smoke sizes the narrowest have not)."""
    pages = []
    for q in SEARCHES:
        cursor = (await store.search(HistoryQuery(q=q, limit=50))).next_cursor
        if cursor is not None:
            pages.append(HistoryQuery(q=q, limit=50, cursor=cursor))
    return pages


async def writer_rate(directory: Path, count: int) -> dict[str, float]:
    """Exchanges consumed on the loop (yielding every 100, as a busy server would) until all are committed."""
    store = SqliteHistory(directory / "writer.db")
    store.start()
    records = [
        ExchangeRecord(
            id=uuid.uuid4().hex,
            ts=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            endpoint="rest",
            client="127.0.0.1:50000",
            backend="ollama",
            model="bench:latest",
            prompt="Explain gravity in one sentence.",
            system=None,
            options=None,
            response="Gravity is the force by which a planet or other body draws objects toward its center. " * 2,
            prompt_chars=32,
            response_chars=170,
            status="ok",
            prompt_tokens=24,
            completion_tokens=40,
            ttft_ms=3.1,
            latency_ms=45.2,
        )
        for _ in range(count)
    ]
    started = time.perf_counter()
    for index, record in enumerate(records):
        store.consume(record)
        if index % 100 == 0:
            await asyncio.sleep(0)
    await store.aclose()
    elapsed = time.perf_counter() - started
    return {"history_writer_per_s": count / elapsed}


async def run(db_path: Path, rows: int, runs: int, writer_records: int) -> dict[str, Any]:
    store = SqliteHistory(db_path)
    try:
        results: dict[str, Any] = generate(store, rows)
        gc.collect()
        results |= await queries(store, runs)
    finally:
        await store.aclose()
    with tempfile.TemporaryDirectory(prefix="history-writer-", dir=db_path.parent) as tmp:
        results |= await writer_rate(Path(tmp), writer_records)
    return results


def measure_database(db_path: Path, rows: int, runs: int, writer_records: int) -> dict[str, Any]:
    """`run` in a fresh process (as bench.logwriter is run): the figures must not inherit the benchmark's
    heap. The database stays at `db_path`, for `measure_request_cost` to write into."""
    command = [sys.executable, "-m", "bench.history", str(db_path), str(rows), str(runs), str(writer_records)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench.history failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return orjson.loads(done.stdout)


def measure_request_cost(fake: Served, workdir: Path, rounds: int, seconds: float, body: str, db_path: Path
                         ) -> dict[str, Any]:  # fmt: skip
    """CPU per request at concurrency 16: the shipped app (history on, writing into the database at
    `db_path`, the large one `measure_database` made) against bench.history_off (the same app, whose
    history drops every exchange), started together, measured in alternating order."""
    with closing(sqlite3.connect(db_path)) as db:
        existing = db.execute("SELECT count(*) FROM exchanges").fetchone()[0]
    servers = {
        "on": start_minivault(workdir, fake.url, name="history-on", env={"MINIVAULT_DB_PATH": str(db_path)}),
        "off": start_minivault(workdir, fake.url, name="history-off", target="bench.history_off:app"),
    }
    rows: dict[str, list[float]] = {}
    try:
        for served in servers.values():
            run_wrk(f"{served.url}/generate", body, 16, 1)
        names = list(servers)
        for round_index in range(rounds):
            for name in names if round_index % 2 == 0 else names[::-1]:
                served = servers[name]
                before = served.cpu_seconds()
                loaded = run_wrk(f"{served.url}/generate", body, 16, seconds)
                cpu = served.cpu_seconds() - before
                rows.setdefault(f"history_{name}_c16_cpu_ms", []).append(cpu / max(loaded.requests, 1) * 1000)
                rows.setdefault(f"history_{name}_c16_rps", []).append(loaded.rps)
                rows.setdefault(f"history_{name}_errors", []).append(loaded.errors)
    finally:
        for served in servers.values():
            served.stop()  # SIGTERM: the history writer commits what it holds before the process exits
    results: dict[str, Any] = {key: statistics.median(values) for key, values in rows.items()}
    # Each round measures both servers back to back: their ratio, round by round, cancels out whatever
    # else the machine was doing during that round better than the ratio of the two medians would.
    ratios = [on / off for on, off in zip(rows["history_on_c16_cpu_ms"], rows["history_off_c16_cpu_ms"], strict=True)]
    results["history_on_off_cpu_ratio"] = statistics.median(ratios)
    # The writer kept up: every exchange the log has is in the database (the log is the source of truth).
    results["history_on_log_lines"] = len(Path(servers["on"].extra["interactions"]).read_bytes().splitlines())
    with closing(sqlite3.connect(db_path)) as db:
        results["history_on_rows"] = db.execute("SELECT count(*) FROM exchanges").fetchone()[0] - existing
    with closing(sqlite3.connect(servers["off"].extra["db"])) as db:
        results["history_off_rows"] = db.execute("SELECT count(*) FROM exchanges").fetchone()[0]
    return results


def main() -> None:
    """`python -m bench.history DB ROWS RUNS WRITER_RECORDS`: fills DB (a new file) and prints the figures."""
    db_path, rows, runs, writer_records = Path(sys.argv[1]), *map(int, sys.argv[2:5])
    gc.collect()
    gc.freeze()  # as MiniVault does after start-up
    results = asyncio.run(run(db_path, rows, runs, writer_records))
    sys.stdout.write(orjson.dumps(results).decode() + "\n")


if __name__ == "__main__":
    main()
