"""The storage contract, held by SQLite and PostgreSQL alike (search, filters, cursors, stats, idempotent
inserts, conversations), and what only PostgreSQL adds: two replicas sharing one database, its lock on a
conversation, and a schema migrated by replicas that start together. PostgreSQL is real (tests/support/postgres.py)."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

from app.core.conversations import ContextLimits, ConversationMemory
from app.schemas import LoggedError
from app.store import ConversationStore, HistoryQuery, HistoryStore, Turn, pg_history, sqlite_history
from app.store.pg import open_pg_stores
from app.store.pg_conversations import PgConversations
from app.store.pg_history import PgHistory
from app.store.pg_schema import SCHEMA_VERSION, PgUnavailable, migrate
from app.store.sqlite_conversations import SqliteConversations
from app.store.sqlite_history import SqliteHistory
from tests.conftest import closed_port_url, make_settings
from tests.test_history import DAY, record, within_one_percent

if TYPE_CHECKING:  # imported by pytest as a plugin, before this module could import it
    from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.anyio
STORES = ["sqlite", "postgres"]


@pytest.fixture(params=STORES)
async def history(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[HistoryStore]:
    if request.param == "sqlite":
        store: SqliteHistory | PgHistory = SqliteHistory(tmp_path / "history.db")
        store.start()
    else:
        store = PgHistory(request.getfixturevalue("pg_url"))
        await store.open()
    yield store
    await store.aclose()


@pytest.fixture(params=STORES)
async def conversations(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConversationStore]:
    if request.param == "sqlite":
        store: SqliteConversations | PgConversations = SqliteConversations(tmp_path / "conversations.db")
    else:
        store = PgConversations(request.getfixturevalue("pg_url"))
        await store.open()
    yield store
    await store.aclose()


async def ids(store: HistoryStore, **query: Any) -> list[str]:
    page = await store.search(HistoryQuery(limit=500, **query))
    assert page.next_cursor is None
    return [item.id for item in page.items]


async def every_page(store: HistoryStore, between: Callable[[], None] = lambda: None, **query: Any) -> list[str]:
    """The ids of every page of a search, calling `between()` after each page."""
    seen: list[str] = []
    cursor = None
    for _ in range(100):
        page = await store.search(HistoryQuery(cursor=cursor, **query))
        seen += [item.id for item in page.items]
        if (cursor := page.next_cursor) is None:
            return seen
        between()
    raise AssertionError("more than 100 pages")


async def until(condition: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Poll `condition` until it holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.01)


# -- history: the contract ---------------------------------------------------------------------------------


async def test_an_exchange_matching_twice_ranks_above_one_matching_once(history: HistoryStore) -> None:
    history.add_many([
        record(1, "what about the moon tonight", "it is bright"),
        record(2, "gravity on the moon tonight", "it is weaker"),
        record(3, "gravity and more gravity please", "falling objects"),
        record(4, "nothing relevant here at all", "no match"),
    ])  # fmt: skip

    assert await ids(history, q="gravity") == ["ex0003", "ex0002"]
    assert await ids(history, q="moon") == ["ex0002", "ex0001"]  # as good a match: newest first


async def test_search_takes_words_prefixes_and_phrases(history: HistoryStore) -> None:
    history.add_many([
        record(1, "What is photosynthesis?", "Plants turn light into sugar."),
        record(2, "Explain a black hole", "A region where gravity wins."),
        record(3, "Is the hole in my sock black?", "Probably."),
        record(4, "Photographs of Mars", "Red dust, mostly."),
        record(5, "CAFÉ opening hours", "Not a café question I know."),
        record(6, "It's O'Brien's \\ back-slash", "tab\there"),
    ])  # fmt: skip

    assert await ids(history, q="light sugar") == ["ex0001"]  # every word, prompt or answer, any order
    assert sorted(await ids(history, q="photo*")) == ["ex0001", "ex0004"]
    assert sorted(await ids(history, q="hole black")) == ["ex0002", "ex0003"]
    assert await ids(history, q='"black hole"') == ["ex0002"]
    assert await ids(history, q='"black hol"*') == ["ex0002"]
    assert await ids(history, q='"a black"*') == ["ex0002"]  # only the last word of a phrase is a prefix
    assert await ids(history, q="cafe") == ["ex0005"]  # case and accents folded
    assert await ids(history, q="Café HOURS") == ["ex0005"]
    assert await ids(history, q="moon") == []
    # Operators of either engine are plain words, never an error; punctuation alone matches nothing.
    assert await ids(history, q="black OR NOT NEAR(x) prompt: *") == []
    assert await ids(history, q="black & !hole | (sock) <-> :*") == ["ex0003"]  # black, hole and sock
    assert await ids(history, q="o'brien* \\ back-slash") == ["ex0006"]
    assert await ids(history, q="?! ...") == []
    assert await ids(history, q="sock ?!") == ["ex0003"]  # a term without words is left out of the rest
    assert await ids(history, q="   ") == ["ex0006", "ex0005", "ex0004", "ex0003", "ex0002", "ex0001"]  # no search


async def test_ranked_pages_go_window_by_window_without_repeats(
    history: HistoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (sqlite_history, pg_history):
        monkeypatch.setattr(module, "RANK_WINDOW", 4)  # 11 matches: windows of the newest 4, 4, then 3
    history.add_many([record(n, "gravity " * (n % 3 + 1) + f"n{n:02d}") for n in range(1, 12)])

    seen = await every_page(history, q="gravity", limit=3)

    # Within a window: more matches first, then newest; the windows themselves newest first.
    windows = [[11, 10, 9, 8], [7, 6, 5, 4], [3, 2, 1]]
    expected = [n for window in windows for n in sorted(window, key=lambda n: (n % 3, n), reverse=True)]
    assert seen == [f"ex{n:04d}" for n in expected]


@pytest.mark.parametrize("q", [None, "gravity"], ids=["newest-first", "ranked"])
async def test_pages_never_repeat_or_skip_while_exchanges_arrive(history: HistoryStore, q: str | None) -> None:
    words = ["apples", "gravity", "pulls", "down", "gravity", "again", "and", "again", "and", "again"]
    history.add_many([record(n, " ".join(words[: n % 10 + 1]) + f" n{n}") for n in range(30)])
    present = await ids(history, q=q)
    counter = iter(range(100, 1000))

    def more_exchanges() -> None:  # newer and older starts, matching and not, longer and shorter
        for _ in range(3):
            n = next(counter)
            history.add_many([record(n, "gravity " * (n % 3 + 1) + "new " * (n % 7) + f"m{n}"),
                              record(-n, f"unrelated words number {n}"), record(n + 1000, "gravity late")])  # fmt: skip

    seen = await every_page(history, more_exchanges, q=q, limit=7)

    assert len(present) == (30 if q is None else 27)
    assert seen == present  # the same exchanges in the same order: none of the later ones joined


async def test_filters_combine_and_bound_the_start_time(history: HistoryStore) -> None:
    history.add_many([
        record(1), record(2, model="llama3:latest"), record(3, status="error", error=LoggedError("backend_error", "x")),
        record(4, endpoint="ws", model="llama3:latest"), record(5, endpoint="sse", status="cancelled"),
        record(6, "gravity", model="llama3:latest", status="error", error=LoggedError("backend_timeout", "y")),
    ])  # fmt: skip

    assert await ids(history, model="llama3:latest") == ["ex0006", "ex0004", "ex0002"]
    assert await ids(history, status="error") == ["ex0006", "ex0003"]
    assert await ids(history, endpoint="ws") == ["ex0004"]
    assert await ids(history, model="llama3:latest", status="error") == ["ex0006"]
    assert await ids(history, q="gravity", status="ok") == []
    assert await ids(history, q="gravity", status="error", since=DAY + timedelta(minutes=6)) == ["ex0006"]
    assert await ids(history, since=DAY + timedelta(minutes=2), until=DAY + timedelta(minutes=5)) == [
        "ex0004", "ex0003", "ex0002"
    ]  # fmt: skip
    # A zone-less bound is UTC; `since` includes its instant, `until` excludes its own; far bounds are fine.
    assert await ids(history, since=datetime(2026, 11, 29, 0, 5), until=datetime(2026, 11, 29, 0, 6)) == ["ex0005"]
    assert len(await ids(history, since=datetime(1, 1, 1, tzinfo=UTC), until=datetime.max)) == 6
    found = await history.get("ex0003")
    assert found is not None and found.error == LoggedError("backend_error", "x")


async def test_listing_is_by_start_time_even_for_exchanges_stored_later(history: HistoryStore) -> None:
    history.add_many([record(n) for n in (2, 4, 5)])
    history.add_many([record(3), record(1)])  # a long answer finishing late, or an old line reindexed

    assert await ids(history) == ["ex0005", "ex0004", "ex0003", "ex0002", "ex0001"]
    page = await history.search(HistoryQuery(limit=2))
    history.add_many([record(6), record(0)])  # arrivals after page one stay out of its later pages
    rest = await history.search(HistoryQuery(limit=500, cursor=page.next_cursor))
    assert [item.id for item in page.items + rest.items] == ["ex0005", "ex0004", "ex0003", "ex0002", "ex0001"]


async def test_add_many_skips_exchanges_already_there_and_keeps_a_reused_id(history: HistoryStore) -> None:
    records = [record(n) for n in range(1, 6)]
    assert history.add_many(records) == 5
    assert history.add_many(records[2:] + [record(6), record(6)]) == 1
    # A client may reuse its X-Request-ID: a second exchange under it is kept, and GET by id finds the latest.
    assert history.add_many([record(7, id="ex0001", prompt="again")]) == 1
    assert history.add_many(records) == 0

    assert await ids(history) == ["ex0001", "ex0006", "ex0005", "ex0004", "ex0003", "ex0002", "ex0001"]
    again = await history.get("ex0001")
    assert again is not None and again.prompt == "again"
    assert await history.get("nope") is None


async def test_get_finds_an_id_exactly_whatever_its_punctuation_and_case(history: HistoryStore) -> None:
    names = ["req-1", "req.1", "REQ-1", "---", 'odd "quoted" id', "5f0c3f7e2b9d4c3e8a1b2c3d4e5f6a7b"]
    history.add_many([record(n, id=name, prompt=f"prompt {n}") for n, name in enumerate(names, 1)])

    for n, name in enumerate(names, 1):
        found = await history.get(name)
        assert found is not None and (found.id, found.prompt) == (name, f"prompt {n}")
    assert await history.get("req") is None
    assert await history.get("req-1-2") is None


async def test_an_exchange_reads_back_as_it_was_recorded(history: HistoryStore) -> None:
    full = record(1, "tell me", "a story", client="127.0.0.1:5000", key_id="k1", conversation_id="c-1",
                  system="Be brief.", options={"temperature": 0.5, "stop": ["\n"]}, done_reason="stop",
                  prompt_tokens=3, completion_tokens=2, queue_ms=1.5, ttft_ms=20.25, latency_ms=845.4,
                  upstream="http://127.0.0.1:11434")  # fmt: skip
    history.add_many([full])  # `upstream` too: SQLite dropped it before issue 16

    assert await history.get("ex0001") == full


async def test_a_record_the_store_cannot_hold_is_skipped_alone(
    history: HistoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [record(n) for n in range(1, 41)]
    rows[20] = record(21, prompt_tokens=2**70)  # a log line can say anything; both stores' integers have 64 bits

    assert history.add_many(rows) == 39

    assert len(await ids(history)) == 39
    assert await history.get("ex0021") is None
    assert "exchange ex0021 cannot be stored" in caplog.text


async def test_stats_count_every_model_and_day(history: HistoryStore) -> None:
    rows = []
    for n in range(1, 101):  # day one, tinyllama: latencies 1..100 ms, every 10th an error, every 25th cancelled
        status = "error" if n % 10 == 0 else "cancelled" if n % 25 == 0 else "ok"
        rows.append(record(n, status=status, prompt_tokens=2, completion_tokens=n, latency_ms=float(n)))
    for n in range(1, 11):  # day two, llama3 (latencies 10..100) and no model at all (a rejected request)
        rows.append(record(100 + n, ts=(DAY + timedelta(days=1, hours=n)).isoformat(), model="llama3:latest",
                           prompt_tokens=5, completion_tokens=1, latency_ms=float(10 * n)))  # fmt: skip
    rows.append(record(200, ts="2026-11-30T12:00:00.000Z", model=None, status="error", latency_ms=None))
    history.add_many(rows[:60])
    history.add_many(rows[60:])  # the daily sums add up across batches

    stats = await history.stats()

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
    part = await history.stats(since=DAY + timedelta(minutes=91), until=DAY + timedelta(days=1, hours=3, minutes=30))
    assert [(d["day"], d["model"], d["count"], d["error"], d["completion_tokens"]) for d in part] == [
        ("2026-11-29", "tinyllama:1.1b-chat", 10, 1, sum(range(91, 101))),
        ("2026-11-30", "llama3:latest", 3, 0, 3),
    ]
    assert within_one_percent(part[0]["latency_ms"], (95, 99, 100))
    assert within_one_percent(part[1]["latency_ms"], (20, 30, 30))
    assert await history.stats(since=DAY + timedelta(days=1), until=DAY + timedelta(days=2)) == stats[1:]
    assert await history.stats(since=DAY, until=DAY) == []


async def test_consumed_exchanges_are_written_and_searchable_after_a_flush(history: HistoryStore) -> None:
    for n in range(1, 301):
        history.consume(record(n, f"consumed number{n}"))

    assert history.flush(30)
    assert len(await ids(history)) == 300
    assert await ids(history, q="number299") == ["ex0299"]


async def test_texts_off_keeps_lengths_and_no_text(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    stores: list[SqliteHistory | PgHistory] = [SqliteHistory(tmp_path / "h.db", keep_text=False)]
    stores.append(PgHistory(request.getfixturevalue("pg_url"), keep_text=False))
    await stores[1].open()
    try:
        for store in stores:
            store.add_many([record(1, "my secret zebracorn", "the answer", system="system zebracorn")])
            found = await store.get("ex0001")
            assert found is not None
            assert (found.prompt, found.system, found.response, found.prompt_chars) == (None, None, None, 19)
            assert await ids(store, q="zebracorn") == []
    finally:
        for store in stores:
            await store.aclose()


# -- conversations: the contract ---------------------------------------------------------------------------


async def test_conversations_are_created_read_listed_and_deleted(conversations: ConversationStore) -> None:
    made = await conversations.create(system="Be brief.")
    named = await conversations.create("mine-1")

    assert (made.title, made.system, made.turns, len(made.id)) == (None, "Be brief.", [], 32)
    assert made.created == made.updated and made.created.endswith("Z")
    assert await conversations.get(made.id) == made
    assert await conversations.get("mine-1") == named
    listed, cursor = await conversations.list(10)
    assert ([c.id for c in listed], cursor) == (["mine-1", made.id], None)
    assert await conversations.delete(made.id) is True
    assert await conversations.delete(made.id) is False
    assert await conversations.get(made.id) is None
    assert [c.id for c in (await conversations.list(10))[0]] == ["mine-1"]


async def test_append_creates_titles_orders_and_pages(conversations: ConversationStore) -> None:
    ts = "2026-11-29T21:41:09.120Z"
    await conversations.append("c1", Turn("  what   is\nup " + "x" * 100, "a1", "ex1", ts), system="S")
    await conversations.append("c2", Turn("other", "b1", "ex2", ts))
    await conversations.append("c1", Turn("second", "a2", "ex3", ts))  # no system: the conversation's stays
    await conversations.append("c3", Turn("third one", "c1", "ex4", ts))
    await conversations.append("c2", Turn("again", "b2", "ex5", ts), system="T")  # c2 moves to the top

    c1, c2 = await conversations.get("c1"), await conversations.get("c2")
    assert c1 is not None and c2 is not None
    assert (c1.title, c1.system) == (("what is up " + "x" * 100)[:80], "S")
    assert [(t.prompt, t.response, t.exchange_id, t.ts) for t in c1.turns] == [
        ("  what   is\nup " + "x" * 100, "a1", "ex1", ts), ("second", "a2", "ex3", ts),
    ]  # fmt: skip
    assert (c2.title, c2.system, [t.prompt for t in c2.turns]) == ("other", "T", ["other", "again"])
    seen, cursor = [], None
    while True:
        page, cursor = await conversations.list(2, cursor)
        seen += [c.id for c in page]
        assert all(c.turns == [] for c in page)
        if cursor is None:
            break
    assert seen == ["c2", "c3", "c1"]
    # A forgotten conversation's turns go with it: the same id starts afresh.
    assert await conversations.delete("c1")
    await conversations.append("c1", Turn("fresh", "f", "ex6", ts))
    fresh = await conversations.get("c1")
    assert fresh is not None and (fresh.title, fresh.system, [t.prompt for t in fresh.turns]) == (
        "fresh",
        None,
        ["fresh"],
    )


# -- PostgreSQL: replicas ------------------------------------------------------------------------------------


async def test_two_replicas_share_one_history_and_its_cursors(pg_url: str) -> None:
    async with AsyncExitStack() as stack:
        one, two = PgHistory(pg_url), PgHistory(pg_url)
        for store in (one, two):
            await store.open()
            stack.push_async_callback(store.aclose)
        for n in range(1, 11):
            (one if n % 2 else two).consume(record(n, f"gravity shared {n}"))
        assert one.flush(10) and two.flush(10)

        first = await one.search(HistoryQuery(limit=4))
        rest = await two.search(HistoryQuery(limit=500, cursor=first.next_cursor))  # page two on the other replica
        ranked = await two.search(HistoryQuery(q="gravity", limit=5))
        ranked_rest = await one.search(HistoryQuery(q="gravity", limit=500, cursor=ranked.next_cursor))
        found = await two.get("ex0003")

    assert [r.id for r in first.items + rest.items] == [f"ex{n:04d}" for n in range(10, 0, -1)]
    assert sorted(r.id for r in ranked.items + ranked_rest.items) == [f"ex{n:04d}" for n in range(1, 11)]
    assert found is not None and found.prompt == "gravity shared 3"


async def test_batches_of_two_replicas_commit_one_after_another(pg_url: str) -> None:
    """A batch waits for another replica's batch to commit, so seq grows in commit order (the cursors' ground);
    meanwhile `consume` still returns at once and reads go on."""
    async with AsyncExitStack() as stack:
        one, two = PgHistory(pg_url), PgHistory(pg_url)
        for store in (one, two):
            await store.open()
            stack.push_async_callback(store.aclose)
        with psycopg.connect(pg_url, autocommit=True) as blocker, blocker.transaction():
            blocker.execute("LOCK TABLE exchanges IN SHARE ROW EXCLUSIVE MODE")  # as a writer mid-batch does
            for n in range(1, 1001):
                one.consume(record(n))
            assert one.flush(0.3) is False  # the writer waits for the lock...
            listing = await two.search(HistoryQuery())  # ...while reads go on
            assert one.records_written == 0
        assert one.flush(30)
        assert (listing.items, one.records_written, one.failing) == ([], 1000, False)
        assert len(await every_page(two, limit=500)) == 1000


async def test_the_writer_reconnects_when_the_server_drops_its_connection(pg_url: str) -> None:
    store = PgHistory(pg_url, linger=0)
    await store.open()
    try:
        store.consume(record(1))
        assert store.flush(10)
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
                          "'minivault' AND backend_type = 'client backend' AND pid <> pg_backend_pid()")  # fmt: skip
        store.consume(record(2))
        assert store.flush(10)
        assert (store.failing, store.records_written) == (False, 2)
        assert await ids(store) == ["ex0002", "ex0001"]
    finally:
        await store.aclose()


async def test_stats_percentiles_are_exact_nearest_rank_values(pg_url: str) -> None:
    store = PgHistory(pg_url)
    await store.open()
    try:
        store.add_many([record(n, latency_ms=n * 1.5) for n in range(1, 201)])
        (day,) = await store.stats()
    finally:
        await store.aclose()
    assert day["latency_ms"] == {"p50": 150.0, "p90": 270.0, "p99": 297.0}  # the 100th, 180th, 198th of 200


async def test_the_upstream_host_is_kept(pg_url: str) -> None:
    store = PgHistory(pg_url)
    await store.open()
    try:
        store.add_many([record(1, upstream="http://127.0.0.1:11434")])
        found = await store.get("ex0001")
    finally:
        await store.aclose()
    assert found is not None and found.upstream == "http://127.0.0.1:11434"


async def test_a_nul_character_is_kept_as_the_replacement_character(pg_url: str) -> None:
    store = PgHistory(pg_url)
    await store.open()
    try:
        store.add_many([record(1, "nul\x00here", "and\x00there", id="a\x00b")])
        found = await store.get("a\x00b")
    finally:
        await store.aclose()
    assert found is not None and (found.id, found.prompt, found.response) == ("a\ufffdb", "nul\ufffdhere",
                                                                             "and\ufffdthere")  # fmt: skip


async def test_two_replicas_migrating_one_empty_database_at_once_both_succeed(pg_url: str) -> None:
    stores = [PgHistory(pg_url), PgHistory(pg_url), PgConversations(pg_url), PgConversations(pg_url)]
    opened = await asyncio.gather(*(store.open() for store in stores), return_exceptions=True)
    for store in stores:
        await store.aclose()
    assert opened == [None] * 4
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT version FROM minivault_schema").fetchall() == [(SCHEMA_VERSION,)]
        db.execute("UPDATE minivault_schema SET version = 99")
    newer = rf"made by a newer MiniVault \(schema 99, this one knows {SCHEMA_VERSION}\)"
    with pytest.raises(PgUnavailable, match=newer):
        migrate(pg_url)


async def test_without_unaccent_search_still_works_but_keeps_accents(
    pg_url: str, postgres: "PostgresServer", caplog: pytest.LogCaptureFixture
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    with postgres.admin() as admin:  # a trusted extension needs CREATE on the database: take it away
        admin.execute(f"REVOKE CREATE ON DATABASE {database} FROM {postgres.owner}")
    store = PgHistory(pg_url)
    await store.open()
    try:
        store.add_many([record(1, "CAFÉ opening hours", "Not a café question.")])
        assert (await ids(store, q="café"), await ids(store, q="CAFE")) == (["ex0001"], [])
    finally:
        await store.aclose()
    assert "no unaccent extension" in caplog.text and "history search will not fold accents" in caplog.text


async def test_a_user_who_may_not_create_tables_is_told_so(pg_url: str, postgres: "PostgresServer") -> None:
    with postgres.admin() as admin:
        admin.execute("CREATE ROLE visitor LOGIN")
    visitor_url = pg_url.replace(f"{postgres.owner}@", "visitor@")
    with pytest.raises(PgUnavailable, match="the user needs CREATE on the database and its schema"):
        migrate(visitor_url)


async def test_an_unreachable_server_is_named_without_its_password(tmp_path: Path) -> None:
    port = closed_port_url().rsplit(":", 1)[1]
    settings = make_settings(log_path=tmp_path / "log.jsonl",
                             database_url=f"postgresql://minivault:s3cret@127.0.0.1:{port}/minivault")  # fmt: skip
    async with AsyncExitStack() as stack:
        with pytest.raises(PgUnavailable) as caught:
            await open_pg_stores(settings, stack)
    assert str(caught.value).startswith(f"cannot connect to PostgreSQL at minivault@127.0.0.1:{port}/minivault (")
    assert str(caught.value).endswith("check MINIVAULT_DATABASE_URL")
    assert "s3cret" not in str(caught.value)


async def test_open_pg_stores_opens_both_and_the_stack_closes_them(pg_url: str, tmp_path: Path) -> None:
    settings = make_settings(log_path=tmp_path / "log.jsonl", database_url=pg_url, max_concurrency=2, max_queue=3)
    async with AsyncExitStack() as stack:
        history_store, conversation_store = await open_pg_stores(settings, stack)
        history_store.consume(record(1))
        await conversation_store.append("c", Turn("p", "r", "ex0001", "2026-11-29T00:01:00.000Z"))
        assert [item.id for item in (await history_store.search(HistoryQuery())).items] == ["ex0001"]
        assert conversation_store._locks is not None and conversation_store._locks.max_size == 5
    with psycopg.connect(pg_url, autocommit=True) as admin:
        open_sessions = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'minivault'")
        assert open_sessions.fetchone() == (0,)


# -- PostgreSQL: one writer per conversation across replicas -------------------------------------------------


async def waiting_for_locks(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        cursor = await db.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        row = await cursor.fetchone()
        return row[0] if row is not None else -1


async def held_locks(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        cursor = await db.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")
        row = await cursor.fetchone()
        return row[0] if row is not None else -1


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[tuple[PgConversations, PgConversations]]:
    one, two = PgConversations(pg_url), PgConversations(pg_url)
    try:
        await one.open()
        await two.open()
        yield one, two
    finally:
        await one.aclose()
        await two.aclose()


async def test_the_lock_serializes_one_conversation_across_two_replicas(
    replicas: tuple[PgConversations, PgConversations], pg_url: str
) -> None:
    one, two = replicas
    order: list[str] = []

    async def second_writer() -> None:
        async with two.lock("shared"):
            order.append("two holds")

    async with one.lock("shared"):
        order.append("one holds")
        waiter = asyncio.create_task(second_writer())
        await until(lambda: _equals(waiting_for_locks(pg_url), 1))  # the other replica waits in PostgreSQL
        async with two.lock("another conversation"):  # which holds no one else
            order.append("two holds another")
        assert not waiter.done()
        order.append("one lets go")
    await asyncio.wait_for(waiter, 20)

    assert order == ["one holds", "two holds another", "one lets go", "two holds"]
    assert await held_locks(pg_url) == 0


async def test_a_writer_cancelled_while_waiting_leaves_no_lock_behind(
    replicas: tuple[PgConversations, PgConversations], pg_url: str
) -> None:
    one, two = replicas

    async def forever() -> None:
        async with two.lock("c"):
            await asyncio.Event().wait()

    async with one.lock("c"):
        waiter = asyncio.create_task(forever())
        await until(lambda: _equals(waiting_for_locks(pg_url), 1))
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert await waiting_for_locks(pg_url) == 0
    async with asyncio.timeout(20), two.lock("c"):  # free at once: nobody kept it
        assert await held_locks(pg_url) == 1
    assert await held_locks(pg_url) == 0


async def test_a_lock_connection_given_back_still_locked_is_unlocked_by_the_pool(
    replicas: tuple[PgConversations, PgConversations], pg_url: str
) -> None:
    pool = replicas[0]._locks
    assert pool is not None
    async with pool.connection() as db:  # as when a waiter is cancelled the moment the server grants it
        await db.execute("SELECT pg_advisory_lock(42)")
    await until(lambda: _equals(held_locks(pg_url), 0))
    async with asyncio.timeout(20), replicas[1].lock("c"):
        assert await held_locks(pg_url) == 1


async def test_conversation_memory_on_two_replicas_serializes_their_prompts(
    replicas: tuple[PgConversations, PgConversations], pg_url: str
) -> None:
    limits = ContextLimits(max_turns=10, max_chars=10_000)
    one, two = ConversationMemory(replicas[0], limits), ConversationMemory(replicas[1], limits)
    await one.acquire("talk")
    second = asyncio.create_task(two.acquire("talk"))
    await until(lambda: _equals(waiting_for_locks(pg_url), 1))
    await one.remember("talk", Turn("first", "answer one", "ex1", "2026-11-29T00:00:00.000Z"), None)
    one.release("talk")  # returns at once; the lock goes back in a task
    await asyncio.wait_for(second, 20)
    chat = await two.chat_input("talk", "m", "next", None, None)  # the turn kept on the other replica
    two.release("talk")
    await one.aclose()
    await two.aclose()

    assert [(m.role, m.content) for m in chat.messages] == [
        ("user", "first"), ("assistant", "answer one"), ("user", "next")
    ]  # fmt: skip
    assert await held_locks(pg_url) == 0


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
