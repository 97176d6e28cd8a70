"""History search within bounds, and each key's own history (issue 15, §2 "History search" and §4).

- A search's words and prefixes are bounded (MINIVAULT_HISTORY_MAX_TERMS, _MIN_PREFIX): the attack's
  330 one-letter prefixes are a 422 naming the limit, before SQLite sees them.
- The worst search still allowed (16 prefixes of three letters, each starting every word of the history)
  runs for many seconds without a budget; with MINIVAULT_HISTORY_QUERY_SECONDS it is stopped (422
  query_too_expensive) within 2 s, and twelve of them at once leave a conversation answering, since
  history reads have threads of their own (MINIVAULT_HISTORY_READERS).
- With keys set, an ordinary key lists, reads and counts only its own exchanges; an admin key sees every
  one. Over real HTTP, on SQLite and on PostgreSQL (tests/support/postgres.py).
"""

import asyncio
import random
import sqlite3
import string
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI

from app.errors import QueryTooExpensive
from app.main import create_app
from app.store import HistoryQuery, sqlite_history
from app.store.pg_history import PgHistory
from app.store.pg_schema import migrate
from app.store.sqlite_history import SearchBudget, SqliteHistory, row_of
from app.web.auth import key_id
from tests.conftest import make_settings
from tests.support.servers import RunningServer, serve_in_thread
from tests.test_history import DAY, record

# The worst search the limits allow: 16 prefixes of three letters, each as broad as can be. FTS5 merges
# every word under a prefix, once per term, and highlights each match of each term. A key holder can make
# such a history with prompts of their own (the index is every key's): here every word starts with `the`,
# so 30,000 exchanges (built in a few seconds) make this search run for many seconds unbounded. On
# bench/history.py's English-like history, `the*` sixteen times takes about 1 s per 100,000 exchanges.
ROWS = 30_000
WORDS = 60  # per answer; prompts have the first 80 characters of another answer
WORST = " ".join(["the*"] * 16)
VOCABULARY = sorted({"the" + "".join(random.Random(n).choices(string.ascii_lowercase, k=4)) for n in range(3000)})
ATTACK = " ".join(f"{letter}*" for letter in ("abcdefghijklmnopqrstuvwxyz0123456789" * 10)[:330])  # 989 characters
SEARCHES = 12
ANSWER_WITHIN = 2.0  # seconds, for the worst search and for each conversation prompt meanwhile
PG_ROWS = 4000  # under RANK_WINDOW: one window, which runs under the timeout the search set first


@pytest.fixture(scope="module")
def big_history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A history database of ROWS exchanges, a second apart, shared by this module's tests (they only add to it)."""
    path = tmp_path_factory.mktemp("big") / "minivault.db"
    rng = random.Random(15)
    texts = [" ".join(rng.choices(VOCABULARY, k=WORDS)) for _ in range(1000)]
    template = list(row_of(record(0)))
    rows = []
    for n in range(ROWS):
        row = template.copy()
        moment = DAY + timedelta(seconds=n)
        row[0], row[1] = f"big{n:06d}", moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")  # id, ts
        row[9], row[12] = texts[n % 1000][:80], texts[(n * 7 + 3) % 1000]  # prompt, response
        rows.append(tuple(row))
    store = SqliteHistory(path)
    try:
        for start in range(0, ROWS, 10_000):
            store.insert_rows(rows[start : start + 10_000])
    finally:
        store.close()
    return path


class Served:
    """MiniVault served for real, and a client for it (with `key` as its API key, when given)."""

    def __init__(self, app: FastAPI, server: RunningServer) -> None:
        self.app, self.server = app, server

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=timeout)

    def flush(self) -> None:
        assert self.app.state.history.flush(10)


@contextmanager
def served_app(fake_server: RunningServer, tmp_path: Path, **overrides: Any) -> Iterator[Served]:
    values = {"ollama_base_url": fake_server.url, "log_path": tmp_path / "logs" / "log.jsonl",
              "db_path": tmp_path / "logs" / "minivault.db", **overrides}  # fmt: skip
    app = create_app(make_settings(**values))
    with serve_in_thread(app) as server:
        yield Served(app, server)


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["message"]


# -- the limits ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "message"),
    [
        (ATTACK, "q: has 330 words; a search may have at most 16 (MINIVAULT_HISTORY_MAX_TERMS)"),
        (" ".join(["gravity"] * 17), "q: has 17 words; a search may have at most 16 (MINIVAULT_HISTORY_MAX_TERMS)"),
        # A phrase is as many lookups as it has words, and so is a word FTS5 cuts at punctuation.
        ('"' + " ".join(["word"] * 17) + '"', "q: has 17 words; a search may have at most 16"),
        (".".join(["x"] * 17), "q: has 17 words; a search may have at most 16"),
        (
            "gravity ab*",
            "q: the prefix ab* is too short; a prefix needs at least 3 characters before the `*` "
            "(MINIVAULT_HISTORY_MIN_PREFIX)",
        ),  # fmt: skip
        ('"black ho"*', "q: the prefix ho* is too short"),  # a phrase's prefix is its last word
        ("photo.a*", "q: the prefix a* is too short"),
    ],
    ids=[
        "330-one-letter-prefixes",
        "17-words",
        "17-word-phrase",
        "17-words-by-punctuation",
        "2-letter-prefix",
        "phrase-prefix",
        "prefix-after-punctuation",
    ],  # fmt: skip
)
def test_a_search_over_the_limits_is_422_naming_the_limit_and_its_setting(
    fake_server: RunningServer, tmp_path: Path, q: str, message: str
) -> None:
    assert len(ATTACK) <= 1000  # within the cap on `q`: the attack the limits stop
    with served_app(fake_server, tmp_path) as served, served.client() as client:
        started = time.perf_counter()
        response = client.get("/history", params={"q": q})
        assert time.perf_counter() - started < 1.0
        status, code, text = error_of(response)
        assert (status, code) == (422, "invalid_request")
        assert text.startswith(message), text


def test_the_limits_are_settings_and_searches_within_them_are_answered(
    fake_server: RunningServer, tmp_path: Path
) -> None:
    with served_app(fake_server, tmp_path, history_max_terms=3, history_min_prefix=1) as served:
        with served.client() as client:
            answer = client.post("/generate", json={"prompt": "gravity pulls apples down"}).json()
            served.flush()
            assert [item["id"] for item in client.get("/history", params={"q": "g* p* a*"}).json()["items"]] == [
                answer["id"]
            ]
            status, code, text = error_of(client.get("/history", params={"q": "g* p* a* d*"}))
            assert (status, code) == (422, "invalid_request")
            assert text.startswith("q: has 4 words; a search may have at most 3 (MINIVAULT_HISTORY_MAX_TERMS)")


def test_the_budget_and_its_error_are_in_the_openapi_document(fake_server: RunningServer, tmp_path: Path) -> None:
    with served_app(fake_server, tmp_path) as served, served.client() as client:
        described = client.get("/openapi.json").json()["paths"]["/history"]["get"]["responses"]["422"]["description"]
    for name in ("query_too_expensive", "MINIVAULT_HISTORY_QUERY_SECONDS", "MINIVAULT_HISTORY_MAX_TERMS",
                 "MINIVAULT_HISTORY_MIN_PREFIX"):  # fmt: skip
        assert name in described


# -- the budget ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_worst_allowed_search_runs_for_seconds_without_a_budget(big_history: Path) -> None:
    """What the budget is for: on this history, the worst search the limits allow runs past 3 s (it would
    run for many more; a 3 s budget says so without waiting for them), and a narrow one does not."""
    store = SqliteHistory(big_history, budget=SearchBudget(seconds=3.0))
    try:
        started = time.perf_counter()
        with pytest.raises(QueryTooExpensive):
            await store.search(HistoryQuery(q=WORST, limit=50))
        assert time.perf_counter() - started < 3.5
        assert len((await store.search(HistoryQuery(q=f"{VOCABULARY[0][:5]}*", limit=50))).items) == 50
    finally:
        await store.aclose()


def test_the_worst_allowed_search_is_stopped_within_2_s(
    fake_server: RunningServer, tmp_path: Path, big_history: Path
) -> None:
    with served_app(fake_server, tmp_path, db_path=big_history) as served, served.client() as client:
        assert client.get("/history", params={"limit": 3}).status_code == 200  # a reader is open
        started = time.perf_counter()
        response = client.get("/history", params={"q": WORST})
        took = time.perf_counter() - started
        status, code, text = error_of(response)
        assert (status, code) == (422, "query_too_expensive")
        assert text == (
            "q: the search ran past 1 s (MINIVAULT_HISTORY_QUERY_SECONDS) and was stopped; narrow it: fewer words, "
            "longer prefixes, or a `model`, `status`, `since` or `until` filter"
        )
        assert took < ANSWER_WITHIN, f"{took:.2f} s"
        # The reader answers the next search: the interrupted one left it clean.
        assert len(client.get("/history", params={"q": VOCABULARY[0], "limit": 3}).json()["items"]) == 3


def test_a_conversation_keeps_answering_while_12_worst_searches_run(
    fake_server: RunningServer, tmp_path: Path, big_history: Path
) -> None:
    with served_app(fake_server, tmp_path, db_path=big_history) as served, served.client() as client:
        first = client.post("/generate", json={"prompt": "let us talk", "conversation_id": "talk"})
        assert first.status_code == 200
        outcomes: list[tuple[int, str | None]] = []
        spans: list[tuple[float, float]] = []
        lock = threading.Lock()

        def search() -> None:
            with served.client(timeout=120) as own:
                started = time.monotonic()
                response = own.get("/history", params={"q": WORST})
                code = response.json()["error"]["code"] if response.status_code != 200 else None
                with lock:
                    outcomes.append((response.status_code, code))
                    spans.append((started, time.monotonic()))

        searches = [threading.Thread(target=search) for _ in range(SEARCHES)]
        for thread in searches:
            thread.start()
        prompts: list[tuple[float, float]] = []  # (sent, answered), monotonic
        deadline = time.monotonic() + 90
        while any(thread.is_alive() for thread in searches):
            assert time.monotonic() < deadline, "the searches did not end"
            sent = time.monotonic()
            answer = client.post("/generate", json={"prompt": f"and then {len(prompts)}?", "conversation_id": "talk"})
            prompts.append((sent, time.monotonic()))
            assert answer.status_code == 200, answer.text
        for thread in searches:
            thread.join()

    assert outcomes == [(422, "query_too_expensive")] * SEARCHES
    # Prompts answered while at least one search was still under way (all of them but the last, at most).
    last_search_ends = max(end for _, end in spans)
    during = [answered - sent for sent, answered in prompts if answered <= last_search_ends]
    slowest = max(answered - sent for sent, answered in prompts)
    # Two reader threads take the 12 searches two by two, each stopped at 1 s: several seconds of searching.
    assert last_search_ends - min(start for start, _ in spans) > 3.0
    assert len(during) >= 5, prompts
    assert slowest < ANSWER_WITHIN, f"a prompt took {slowest:.2f} s during the searches"


@pytest.mark.anyio
async def test_postgres_stops_a_search_past_its_budget(pg_url: str) -> None:
    """statement_timeout in the search's transaction: a search over many matching exchanges is cancelled
    (422 query_too_expensive), and the pool's connection is left with no timeout on it."""
    words = " ".join(f"thematic{n} theory{n} thesis{n}" for n in range(40))
    store = PgHistory(pg_url, budget=SearchBudget(seconds=0.002), readers=1)
    unbounded = PgHistory(pg_url, budget=SearchBudget(seconds=600), readers=1)
    await store.open()
    await unbounded.open()
    try:
        store.add_many(record(n, f"prompt {n} {words}", "ok") for n in range(1, PG_ROWS + 1))
        started = time.perf_counter()
        page = await unbounded.search(HistoryQuery(q=WORST, limit=50))
        took = time.perf_counter() - started
        assert len(page.items) == 50
        # Well past the budget: the search's one window, which runs under the timeout set before it (the store
        # checks the time itself only between windows), is cancelled by PostgreSQL.
        assert took > 0.002 * 5, f"the search took only {took:.3f} s unbounded"
        expensive = r"^q: the search ran past 0.002 s \(MINIVAULT_HISTORY_QUERY_SECONDS\)"
        with pytest.raises(QueryTooExpensive, match=expensive):
            await store.search(HistoryQuery(q=WORST, limit=50))
        async with store._pool().connection() as db:  # the one connection: its SET LOCAL ended with the search
            row = await (await db.execute("SHOW statement_timeout")).fetchone()
            assert row == ("0",)
    finally:
        await store.aclose()
        await unbounded.aclose()


# -- each key sees its own -------------------------------------------------------------------------------------

KEY_A, KEY_B, ADMIN = "key-a-secret", "key-b-secret", "admin-secret"


@pytest.fixture(params=["sqlite", "postgres"])
def keyed(request: pytest.FixtureRequest, fake_server: RunningServer, tmp_path: Path) -> Iterator[Served]:
    """MiniVault with two ordinary keys and an admin key, its history in SQLite or PostgreSQL."""
    extra = {"database_url": request.getfixturevalue("pg_url")} if request.param == "postgres" else {}
    with served_app(fake_server, tmp_path, api_keys=f"{KEY_A},{KEY_B}", admin_keys=ADMIN, **extra) as served:
        yield served


def _ids(client: httpx.Client, **params: Any) -> list[str]:
    response = client.get("/history", params={"limit": 500, **params})
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


def _counts(client: httpx.Client) -> list[tuple[str | None, int]]:
    response = client.get("/history/stats")
    assert response.status_code == 200, response.text
    return [(day["model"], day["count"]) for day in response.json()["days"]]


def test_each_key_lists_reads_and_counts_only_its_own_exchanges(keyed: Served) -> None:
    with keyed.client(KEY_A) as a, keyed.client(KEY_B) as b, keyed.client(ADMIN) as admin:
        mine_a = [a.post("/generate", json={"prompt": f"alpha secret {n}"}).json()["id"] for n in range(3)]
        mine_b = [b.post("/generate", json={"prompt": f"bravo secret {n}", "model": "llama3:latest"}).json()["id"]
                  for n in range(2)]  # fmt: skip
        keyed.flush()

        assert _ids(a) == mine_a[::-1]
        assert _ids(b) == mine_b[::-1]
        assert _ids(admin) == (mine_a + mine_b)[::-1]  # interleaved in time: A's three, then B's two
        assert _ids(a, q="bravo") == []
        assert sorted(_ids(a, q="secret")) == sorted(mine_a)
        assert sorted(_ids(admin, q="secret")) == sorted(mine_a + mine_b)
        assert _ids(a, model="llama3:latest") == []

        # Another key's exchange is not found, with the very answer a missing id gets.
        stranger = a.get(f"/history/{mine_b[0]}")
        missing = a.get("/history/no-such-exchange")
        assert (stranger.status_code, stranger.json()["error"]["code"]) == (404, "not_found")
        assert stranger.json()["error"]["message"] == missing.json()["error"]["message"].replace(
            "no-such-exchange", mine_b[0]
        )
        assert a.get(f"/history/{mine_a[0]}").json()["key_id"] == key_id(KEY_A)
        assert b.get(f"/history/{mine_b[1]}").json()["key_id"] == key_id(KEY_B)
        assert admin.get(f"/history/{mine_a[0]}").status_code == admin.get(f"/history/{mine_b[0]}").status_code == 200

        assert _counts(a) == [("tinyllama:1.1b-chat", 3)]
        assert _counts(b) == [("llama3:latest", 2)]
        assert _counts(admin) == [("llama3:latest", 2), ("tinyllama:1.1b-chat", 3)]
        # A partial day (since an hour ago) is summed from the exchanges: scoped the same way.
        hour_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
        partial = a.get("/history/stats", params={"since": hour_ago}).json()["days"]
        assert [(day["model"], day["count"]) for day in partial] == [("tinyllama:1.1b-chat", 3)]


def test_with_auth_off_everyone_sees_every_exchange(fake_server: RunningServer, tmp_path: Path) -> None:
    with served_app(fake_server, tmp_path) as served, served.client() as client:
        made = [client.post("/generate", json={"prompt": f"open {n}"}).json()["id"] for n in range(2)]
        served.flush()
        assert _ids(client) == made[::-1]
        assert client.get(f"/history/{made[0]}").status_code == 200
        assert _counts(client) == [("tinyllama:1.1b-chat", 2)]


# -- the indexes serving one key's listing -------------------------------------------------------------------


def test_sqlite_lists_one_keys_exchanges_through_its_index(tmp_path: Path) -> None:
    store = SqliteHistory(tmp_path / "h.db")
    try:
        query = HistoryQuery(key_id="abcd1234")
        where, params = sqlite_history._filters(query)
        sql = (f"EXPLAIN QUERY PLAN SELECT {sqlite_history._RECORD_COLUMNS} FROM exchanges e "
               f"WHERE {' AND '.join(where)} AND e.seq <= ? ORDER BY e.ts DESC, e.id DESC LIMIT 50")  # fmt: skip
        plan = store.read(lambda db: db.execute(sql, (*params, 10)).fetchall())
    finally:
        store.close()
    details = " ".join(row[-1] for row in plan)
    assert "USING INDEX exchanges_by_key (key_id=?)" in details, details
    assert "TEMP B-TREE" not in details, details  # in index order: no sort


@pytest.mark.anyio
async def test_a_schema_2_database_is_summed_per_key_when_opened(tmp_path: Path) -> None:
    """Schema 2 summed days per model only: opening it makes the per-key tables from the exchanges."""
    path = tmp_path / "h.db"
    store = SqliteHistory(path)
    store.add_many([record(1, key_id="aaaa0001"), record(2, key_id="aaaa0001", model="other"),
                    record(3, key_id="bbbb0002"), record(4)])  # fmt: skip
    store.close()
    with closing(sqlite3.connect(path, isolation_level=None)) as db:  # back to schema 2's tables
        db.execute("DROP INDEX exchanges_by_key")
        db.execute("DROP TABLE exchange_days")
        db.execute("DROP TABLE exchange_latencies")
        db.execute("CREATE TABLE exchange_days (day TEXT NOT NULL, model TEXT NOT NULL, count INTEGER NOT NULL, "
                   "ok INTEGER NOT NULL, error INTEGER NOT NULL, cancelled INTEGER NOT NULL, prompt_tokens INTEGER "
                   "NOT NULL, completion_tokens INTEGER NOT NULL, PRIMARY KEY (day, model)) WITHOUT ROWID")  # fmt: skip
        db.execute("CREATE TABLE exchange_latencies (day TEXT NOT NULL, model TEXT NOT NULL, bucket INTEGER NOT NULL, "
                   "count INTEGER NOT NULL, PRIMARY KEY (day, model, bucket)) WITHOUT ROWID")  # fmt: skip
        db.execute("PRAGMA user_version = 2")

    reopened = SqliteHistory(path)
    try:
        day = DAY.date().isoformat()
        everyone = await reopened.stats()
        assert [(d["day"], d["model"], d["count"]) for d in everyone] == [
            (day, "other", 1), (day, "tinyllama:1.1b-chat", 3)
        ]  # fmt: skip
        assert [(d["model"], d["count"]) for d in await reopened.stats(key_id="aaaa0001")] == [
            ("other", 1), ("tinyllama:1.1b-chat", 1)
        ]  # fmt: skip
        only_b = await reopened.stats(key_id="bbbb0002")
        assert [(d["model"], d["count"], d["latency_ms"]["p50"]) for d in only_b] == [
            ("tinyllama:1.1b-chat", 1, pytest.approx(3.0, rel=0.01))
        ]
        assert reopened.read(lambda db: db.execute("PRAGMA user_version").fetchone()[0]) == 3
        indexes = reopened.read(lambda db: [row[1] for row in db.execute("PRAGMA index_list(exchanges)")])
        assert "exchanges_by_key" in indexes
    finally:
        reopened.close()


@pytest.mark.anyio
async def test_postgres_lists_one_keys_exchanges_through_its_index(pg_url: str) -> None:
    await asyncio.to_thread(migrate, pg_url)
    with psycopg.connect(pg_url, autocommit=True) as db:
        with db.transaction():
            db.execute("SET LOCAL enable_seqscan = off")  # a tiny table: make the planner say what it could use
            plan = db.execute(
                "EXPLAIN SELECT seq FROM exchanges e WHERE e.key_id = 'abcd1234' AND e.seq <= 10 "
                "ORDER BY e.ts DESC, e.id DESC LIMIT 50"
            ).fetchall()
    details = " ".join(row[0] for row in plan)
    assert "Index Scan Backward using exchanges_by_key" in details, details
    assert "Sort" not in details, details
