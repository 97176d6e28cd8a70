"""The exchange history: SQLite store (search, filters, pages, stats, idempotent inserts, LOG_PROMPTS=false)
and GET /history, /history/{id}, /history/stats over real HTTP in front of the fake Ollama."""

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from app.schemas import ExchangeRecord, LoggedError
from app.store import HistoryQuery, sqlite_history
from app.store.sqlite_history import HistoryUnavailable, SqliteHistory
from tests.conftest import make_settings, read_log
from tests.support.servers import RunningServer, serve_in_thread

pytestmark = pytest.mark.anyio
DAY = datetime(2026, 11, 29, tzinfo=UTC)


def record(n: int, prompt: str = "hello", response: str = "world", **fields: Any) -> ExchangeRecord:
    """Exchange `n`, started n minutes into DAY unless `ts` says otherwise."""
    values: dict[str, Any] = {
        "id": f"ex{n:04d}", "ts": _iso(DAY + timedelta(minutes=n)), "endpoint": "rest", "backend": "ollama",
        "model": "tinyllama:1.1b-chat", "prompt": prompt, "response": response, "status": "ok",
        "prompt_chars": len(prompt), "response_chars": len(response), "latency_ms": float(n),
    }  # fmt: skip
    return ExchangeRecord(**{**values, **fields})


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteHistory]:
    history = SqliteHistory(tmp_path / "history.db")
    yield history
    history.close()


async def ids(store: SqliteHistory, **query: Any) -> list[str]:
    page = await store.search(HistoryQuery(limit=500, **query))
    assert page.next_cursor is None
    return [item.id for item in page.items]


# -- the store ---------------------------------------------------------------------------------------------


async def test_an_exchange_matching_twice_ranks_above_one_matching_once(store: SqliteHistory) -> None:
    store.add_many([
        record(1, "what about the moon tonight", "it is bright"),
        record(2, "gravity on the moon tonight", "it is weaker"),
        record(3, "gravity and more gravity please", "falling objects"),
        record(4, "nothing relevant here at all", "no match"),
    ])  # fmt: skip

    assert await ids(store, q="gravity") == ["ex0003", "ex0002"]
    assert await ids(store, q="moon") == ["ex0002", "ex0001"]  # as good a match: newest first


async def test_search_takes_words_prefixes_and_phrases(store: SqliteHistory) -> None:
    store.add_many([
        record(1, "What is photosynthesis?", "Plants turn light into sugar."),
        record(2, "Explain a black hole", "A region where gravity wins."),
        record(3, "Is the hole in my sock black?", "Probably."),
        record(4, "Photographs of Mars", "Red dust, mostly."),
        record(5, "CAFÉ opening hours", "Not a café question I know."),
    ])  # fmt: skip

    assert await ids(store, q="light sugar") == ["ex0001"]  # every word, prompt or answer, any order
    assert sorted(await ids(store, q="photo*")) == ["ex0001", "ex0004"]
    assert sorted(await ids(store, q="hole black")) == ["ex0002", "ex0003"]
    assert await ids(store, q='"black hole"') == ["ex0002"]
    assert await ids(store, q='"black hol"*') == ["ex0002"]
    assert await ids(store, q="cafe") == ["ex0005"]  # case and accents folded
    assert await ids(store, q="moon") == []
    # FTS5's own syntax is quoted away: operators and column filters are plain words, never an error.
    assert await ids(store, q="black OR NOT NEAR(x) prompt: *") == []
    assert await ids(store, q="   ") == ["ex0005", "ex0004", "ex0003", "ex0002", "ex0001"]  # no words: no search


async def test_ranked_pages_go_window_by_window_without_repeats(
    store: SqliteHistory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_history, "RANK_WINDOW", 4)  # 11 matches: windows of the newest 4, 4, then 3
    store.add_many([record(n, "gravity " * (n % 3 + 1) + f"n{n:02d}") for n in range(1, 12)])
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.search(HistoryQuery(q="gravity", limit=3, cursor=cursor))
        seen += [item.id for item in page.items]
        if (cursor := page.next_cursor) is None:
            break

    # Within a window: more matches first, then newest; the windows themselves newest first.
    windows = [[11, 10, 9, 8], [7, 6, 5, 4], [3, 2, 1]]
    expected = [n for window in windows for n in sorted(window, key=lambda n: (n % 3, n), reverse=True)]
    assert seen == [f"ex{n:04d}" for n in expected]


async def test_filters_combine_and_bound_the_start_time(store: SqliteHistory) -> None:
    store.add_many([
        record(1), record(2, model="llama3:latest"), record(3, status="error", error=LoggedError("backend_error", "x")),
        record(4, endpoint="ws", model="llama3:latest"), record(5, endpoint="sse", status="cancelled"),
        record(6, "gravity", model="llama3:latest", status="error", error=LoggedError("backend_timeout", "y")),
    ])  # fmt: skip

    assert await ids(store, model="llama3:latest") == ["ex0006", "ex0004", "ex0002"]
    assert await ids(store, status="error") == ["ex0006", "ex0003"]
    assert await ids(store, endpoint="ws") == ["ex0004"]
    assert await ids(store, model="llama3:latest", status="error") == ["ex0006"]
    assert await ids(store, q="gravity", status="ok") == []
    assert await ids(store, since=DAY + timedelta(minutes=2), until=DAY + timedelta(minutes=5)) == [
        "ex0004", "ex0003", "ex0002"
    ]  # fmt: skip
    # A zone-less bound is UTC; `since` includes its instant, `until` excludes its own.
    assert await ids(store, since=datetime(2026, 11, 29, 0, 5), until=datetime(2026, 11, 29, 0, 6)) == ["ex0005"]
    error = (await store.get("ex0003")).error  # type: ignore[union-attr]
    assert error == LoggedError("backend_error", "x")


async def test_listing_is_by_start_time_even_for_exchanges_stored_later(store: SqliteHistory) -> None:
    store.add_many([record(n) for n in (2, 4, 5)])
    store.add_many([record(3), record(1)])  # a long answer finishing late, or an old line reindexed

    assert await ids(store) == ["ex0005", "ex0004", "ex0003", "ex0002", "ex0001"]
    page = await store.search(HistoryQuery(limit=2))
    store.add_many([record(6), record(0)])  # arrivals after page one stay out of its later pages
    rest = await store.search(HistoryQuery(limit=500, cursor=page.next_cursor))
    assert [item.id for item in page.items + rest.items] == ["ex0005", "ex0004", "ex0003", "ex0002", "ex0001"]


async def test_add_many_skips_exchanges_already_there_and_keeps_a_reused_id(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    records = [record(n) for n in range(1, 6)]
    history = SqliteHistory(path)  # never started: the reindex command's way
    assert history.add_many(records) == 5
    assert history.add_many(records[2:] + [record(6)]) == 1
    # A client may reuse its X-Request-ID: a second exchange under it is kept, and GET by id finds the latest.
    assert history.add_many([record(7, id="ex0001", prompt="again")]) == 1
    history.close()

    reopened = SqliteHistory(path)
    try:
        assert reopened.add_many(records) == 0
        assert await ids(reopened) == ["ex0001", "ex0006", "ex0005", "ex0004", "ex0003", "ex0002", "ex0001"]
        assert (await reopened.get("ex0001")).prompt == "again"  # type: ignore[union-attr]
        assert await reopened.get("nope") is None
        version = reopened.read(lambda db: db.execute("PRAGMA user_version").fetchone()[0])
        assert version == sqlite_history.SCHEMA_VERSION
    finally:
        reopened.close()


async def test_a_database_of_the_development_schema_is_emptied_and_made_anew(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    with closing(sqlite3.connect(path)) as old:
        old.executescript("CREATE TABLE exchanges (seq INTEGER PRIMARY KEY, t_ms INTEGER); PRAGMA user_version = 1;")
    history = SqliteHistory(path)
    try:
        assert history.add_many([record(1)]) == 1
        assert await ids(history) == ["ex0001"]
    finally:
        history.close()
    with closing(sqlite3.connect(path)) as newer:
        newer.execute("PRAGMA user_version = 99")
    with pytest.raises(HistoryUnavailable, match="made by a newer MiniVault"):
        SqliteHistory(path)


async def test_get_finds_an_id_exactly_whatever_its_punctuation_and_case(store: SqliteHistory) -> None:
    names = ["req-1", "req.1", "REQ-1", "---", 'odd "quoted" id', "5f0c3f7e2b9d4c3e8a1b2c3d4e5f6a7b"]
    store.add_many([record(n, id=name, prompt=f"prompt {n}") for n, name in enumerate(names, 1)])

    for n, name in enumerate(names, 1):
        found = await store.get(name)
        assert found is not None and (found.id, found.prompt) == (name, f"prompt {n}")
    assert await store.get("req") is None
    assert await store.get("req-1-2") is None


def test_the_database_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    history = SqliteHistory(tmp_path / "history.db")
    history.add_many([record(1)])
    try:
        files = sorted(tmp_path.glob("history.db*"))
        assert [file.name for file in files] == ["history.db", "history.db-shm", "history.db-wal"]
        assert {file.name: file.stat().st_mode & 0o777 for file in files} == {file.name: 0o600 for file in files}
    finally:
        history.close()


def within_one_percent(latency: dict[str, float] | None, expected: tuple[float, float, float]) -> bool:
    """Latency percentiles come from 2% wide buckets: each within 1% of the exact nearest-rank value."""
    assert latency is not None
    return all(abs(latency[f"p{p}"] - value) <= value / 100 for p, value in zip((50, 90, 99), expected, strict=True))


async def test_a_record_sqlite_cannot_hold_is_skipped_alone(
    store: SqliteHistory, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [record(n) for n in range(1, 41)]
    rows[20] = record(21, prompt_tokens=2**70)  # a log line can say anything; SQLite integers have 64 bits

    assert store.add_many(rows) == 39

    assert len(await ids(store)) == 39
    assert await store.get("ex0021") is None
    assert "exchange ex0021 cannot be stored" in caplog.text


async def test_stats_count_every_model_and_day(store: SqliteHistory) -> None:
    rows = []
    for n in range(1, 101):  # day one, tinyllama: latencies 1..100 ms, every 10th an error, every 25th cancelled
        status = "error" if n % 10 == 0 else "cancelled" if n % 25 == 0 else "ok"
        rows.append(record(n, status=status, prompt_tokens=2, completion_tokens=n, latency_ms=float(n)))
    for n in range(1, 11):  # day two, llama3 (latencies 10..100) and no model at all (a rejected request)
        rows.append(record(100 + n, ts=_iso(DAY + timedelta(days=1, hours=n)), model="llama3:latest",
                           prompt_tokens=5, completion_tokens=1, latency_ms=float(10 * n)))  # fmt: skip
    rows.append(record(200, ts=_iso(DAY + timedelta(days=1, hours=12)), model=None, status="error",
                       latency_ms=None))  # fmt: skip
    store.add_many(rows[:60])
    store.add_many(rows[60:])  # the daily sums add up across batches

    stats = await store.stats()

    counts = [{key: value for key, value in day.items() if key != "latency_ms"} for day in stats]
    assert counts == [
        {"day": "2026-11-29", "model": "tinyllama:1.1b-chat", "count": 100, "ok": 88, "error": 10, "cancelled": 2,
         "prompt_tokens": 200, "completion_tokens": 5050},
        {"day": "2026-11-30", "model": None, "count": 1, "ok": 0, "error": 1, "cancelled": 0,
         "prompt_tokens": 0, "completion_tokens": 0},
        {"day": "2026-11-30", "model": "llama3:latest", "count": 10, "ok": 10, "error": 0, "cancelled": 0,
         "prompt_tokens": 50, "completion_tokens": 10},
    ]  # fmt: skip
    assert within_one_percent(stats[0]["latency_ms"], (50, 90, 99))
    assert stats[1]["latency_ms"] is None
    assert within_one_percent(stats[2]["latency_ms"], (50, 90, 100))
    # Bounds inside a day count that day's part only (exchanges 91..100 of day one; llama3's first 3 hours).
    part = await store.stats(since=DAY + timedelta(minutes=91), until=DAY + timedelta(days=1, hours=3, minutes=30))
    assert [(d["day"], d["model"], d["count"], d["error"], d["completion_tokens"]) for d in part] == [
        ("2026-11-29", "tinyllama:1.1b-chat", 10, 1, sum(range(91, 101))),
        ("2026-11-30", "llama3:latest", 3, 0, 3),
    ]
    assert within_one_percent(part[0]["latency_ms"], (95, 99, 100))
    assert within_one_percent(part[1]["latency_ms"], (20, 30, 30))
    assert await store.stats(since=DAY + timedelta(days=1), until=DAY + timedelta(days=2)) == stats[1:]
    assert await store.stats(since=DAY, until=DAY) == []


async def test_a_failed_batch_is_kept_and_written_once_the_database_is_free(tmp_path: Path) -> None:
    history = SqliteHistory(tmp_path / "history.db", busy_timeout_ms=50)
    history.start()
    blocker = sqlite3.connect(tmp_path / "history.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the busy timeout
        history.consume(record(1))
        assert history.flush(10)
        assert history.failing and "locked" in (history.last_error or "")
        blocker.execute("ROLLBACK")
        history.consume(record(2))
        assert history.flush(10)
        assert not history.failing
        assert await ids(history) == ["ex0002", "ex0001"]
        assert history.records_written == 2
    finally:
        blocker.close()
        await history.aclose()


# -- over HTTP ---------------------------------------------------------------------------------------------


class Served:
    """MiniVault with its history, served for real, and a client for it."""

    def __init__(self, app: FastAPI, server: RunningServer, client: httpx.Client) -> None:
        self.app, self.server, self.client = app, server, client

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.client.get(path, params={k: v for k, v in params.items() if v is not None})

    def generate(self, prompt: str, **body: Any) -> dict[str, Any]:
        response = self.client.post("/generate", json={"prompt": prompt, **body})
        assert response.status_code == 200, response.text
        return response.json()

    def flush(self) -> None:
        assert self.app.state.history.flush(10)
        assert self.app.state.interaction_log.flush(10)


@pytest.fixture
def served(fake_server: RunningServer, tmp_path: Path) -> Iterator[Served]:
    with served_app(fake_server, tmp_path) as running:
        yield running


@contextmanager
def served_app(fake_server: RunningServer, tmp_path: Path, **overrides: Any) -> Iterator[Served]:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=tmp_path / "logs" / "log.jsonl",
                             db_path=tmp_path / "logs" / "minivault.db", **overrides)  # fmt: skip
    app = create_app(settings)
    with serve_in_thread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield Served(app, server, client)


def test_exchanges_through_the_gateway_are_in_the_history_as_logged(served: Served, tmp_path: Path) -> None:
    answer = served.generate("tell me about gravity", options={"temperature": 0.5})
    failed = served.client.post("/generate", json={"prompt": "x", "model": "fail-500:latest"})
    assert failed.status_code == 502
    served.flush()

    logged = {line["id"]: line for line in read_log(tmp_path / "logs" / "log.jsonl")}
    assert len(logged) == 2
    for exchange_id, line in logged.items():
        response = served.get(f"/history/{exchange_id}")
        assert response.status_code == 200
        assert response.json() == line
    page = served.get("/history").json()
    assert [item["id"] for item in page["items"]] == [failed.headers["x-request-id"], answer["id"]]
    assert page["next_cursor"] is None
    assert page["items"][0]["error"]["code"] == "backend_error"
    assert served.get("/history", q="gravity").json()["items"] == [logged[answer["id"]]]


def test_an_unknown_id_is_404_not_found(served: Served) -> None:
    response = served.get("/history/no-such-exchange")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "not_found"
    assert error["message"] == "no exchange with id 'no-such-exchange' in the history; GET /history lists them"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"q": 'a "black hole'}, "q: has an unpaired double quote"),
        ({"limit": 0}, "query.limit: "),
        ({"limit": 501}, "query.limit: "),
        ({"cursor": "not-a-cursor"}, "query.cursor: "),
        ({"since": "yesterday"}, "query.since: "),
        ({"until": "1764400000"}, "query.until: must be an ISO 8601 date"),  # not seconds since 1970
        ({"status": "fine"}, "query.status: "),
        ({"endpoint": "grpc"}, "query.endpoint: "),
        ({"q": "x" * 1001}, "query.q: "),
    ],
)
def test_bad_parameters_are_422_naming_the_parameter(served: Served, params: dict[str, Any], message: str) -> None:
    response = served.get("/history", **params)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(message), error["message"]


def test_stats_over_http_match_the_exchanges_made(served: Served) -> None:
    for prompt in ("one two", "three four five", "six"):
        served.generate(prompt)
    served.generate("seven", model="llama3:latest")
    served.client.post("/generate", json={"prompt": "x", "model": "fail-500:latest"})
    served.flush()

    today = datetime.now(UTC).date().isoformat()
    days = served.get("/history/stats", since=_iso(datetime.now(UTC) - timedelta(hours=1))).json()["days"]

    summary = [(d["day"], d["model"], d["count"], d["ok"], d["error"], d["completion_tokens"]) for d in days]
    assert summary == [
        (today, "fail-500:latest", 1, 0, 1, 0),
        (today, "llama3:latest", 1, 1, 0, 1),
        (today, "tinyllama:1.1b-chat", 3, 3, 0, 6),
    ]
    for entry in days:
        latency = entry["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] < 10_000
    assert served.get("/history/stats", until="2000-01-01").json() == {"days": []}  # a bare date: its midnight


def _all_pages(served: Served, between: Any, **params: Any) -> list[str]:
    """Every page of a listing, calling `between()` after each page; the ids in page order."""
    seen: list[str] = []
    cursor = None
    for _ in range(100):
        body = served.get("/history", limit=7, cursor=cursor, **params).json()
        seen += [item["id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
        between()
    raise AssertionError("more than 100 pages")


@pytest.mark.parametrize("q", [None, "gravity"], ids=["newest-first", "ranked"])
def test_pages_never_repeat_or_skip_while_exchanges_arrive(served: Served, q: str | None) -> None:
    words = ["apples", "gravity", "pulls", "down", "gravity", "again", "and", "again", "and", "again"]
    for n in range(30):  # matches of every length, once or twice, and exchanges that do not match
        served.generate(" ".join(words[: n % 10 + 1]) + f" n{n}")
    served.flush()
    present = [item["id"] for item in served.get("/history", limit=500, q=q).json()["items"]]
    counter = iter(range(1000))

    def more_exchanges() -> None:  # longer and shorter ones, matching and not, between every two pages
        for _ in range(3):
            n = next(counter)
            served.generate(("gravity " * (n % 3 + 1)) + "new " * (n % 7) + f"m{n}")
            served.generate(f"unrelated words number {n}")
        served.flush()

    seen = _all_pages(served, more_exchanges, q=q)

    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(present)
    assert len(present) == (30 if q is None else 27)
    if q is None:
        assert seen == present


def test_log_prompts_false_keeps_every_text_out_of_the_database(fake_server: RunningServer, tmp_path: Path) -> None:
    secret = "zebracorn-" + "7" * 12
    with served_app(fake_server, tmp_path, log_prompts=False) as served:
        answer = served.generate(f"my secret is {secret}", system=f"system {secret}")
        served.flush()
        item = served.get(f"/history/{answer['id']}").json()
        assert (item["prompt"], item["system"], item["response"]) == (None, None, None)
        assert item["prompt_chars"] == len(f"my secret is {secret}")
        assert served.get("/history", q="secret").json() == {"items": [], "next_cursor": None}
        files = sorted((tmp_path / "logs").glob("minivault.db*"))
        assert [file.name for file in files] == ["minivault.db", "minivault.db-shm", "minivault.db-wal"]
        for file in files:  # while running (the WAL holds the latest pages) ...
            assert secret.encode() not in file.read_bytes(), file.name
    for file in sorted((tmp_path / "logs").glob("minivault.db*")):  # ... and after the checkpoint at shutdown
        assert secret.encode() not in file.read_bytes(), file.name


def test_history_needs_the_api_key_when_keys_are_set(fake_server: RunningServer, tmp_path: Path) -> None:
    with served_app(fake_server, tmp_path, api_keys="k1") as served:
        for path in ("/history", "/history/stats", "/history/some-id"):
            refused = served.get(path)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "unauthorized"
        served.client.headers["Authorization"] = "Bearer k1"
        assert served.get("/history").json() == {"items": [], "next_cursor": None}
        assert served.get("/history/stats").json() == {"days": []}
        assert served.get("/history/some-id").status_code == 404


def test_consume_returns_at_once_while_the_writer_is_stuck(tmp_path: Path) -> None:
    history = SqliteHistory(tmp_path / "history.db")
    history.start()
    blocker = sqlite3.connect(tmp_path / "history.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the writer waits (up to its busy timeout) behind this lock
    try:
        for n in range(1, 1001):
            history.consume(record(n))
        assert history.records_written == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert history.flush(30)
    assert history.records_written == 1000
    history.close()
