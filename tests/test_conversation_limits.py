"""Long conversations stay cheap, and each key sees its own: a prompt reads only the turns it can send (in
SQL), `GET /conversations/{id}` pages its turns with a stable cursor, and an ordinary key cannot see, continue
or delete another key's conversation (REST, SSE and websocket; SQLite and a real PostgreSQL)."""

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from websockets.asyncio.client import connect

from app.config import Settings
from app.main import create_app
from app.store import Turn
from app.store.pg_conversations import RECENT, PgConversations
from app.store.pg_schema import SCHEMA_VERSION, migrate
from app.store.sqlite_conversations import SqliteConversations
from app.web.auth import key_id
from tests.conftest import make_settings
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

pytestmark = pytest.mark.anyio

TURNS = 1_500
MAX_TURNS = 20
KEY_A, KEY_B, ROOT = "key-a-0123456789", "key-b-0123456789", "root-0123456789"


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def turn_text(n: int) -> tuple[str, str]:
    return f"p{n:04d}", f"r{n:04d}"


def add_turns(settings: Settings, conversation_id: str, count: int, key: str | None = None) -> None:
    """A conversation of `count` turns written straight into the database (fast: one statement or transaction)."""
    owner = key_id(key) if key is not None else None
    ts = "2026-11-29T21:41:09.120Z"
    if settings.database_url is not None:
        url = settings.database_url.get_secret_value()
        migrate(url)  # makes the tables
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(
                "INSERT INTO conversations (id, title, system, created, updated, seq, key_id) "
                "VALUES (%s, 'p0001', NULL, %s, %s, nextval('conversation_changes'), %s)",
                (conversation_id, ts, ts, owner),
            )
            db.execute(
                "INSERT INTO turns (conversation_id, n, prompt, response, exchange_id, ts) SELECT %s, g, "
                "'p' || lpad(g::text, 4, '0'), 'r' || lpad(g::text, 4, '0'), 'ex' || g, %s "
                "FROM generate_series(1, %s) g",
                (conversation_id, ts, count),
            )
        return
    SqliteConversations(settings.db_path)  # makes the tables
    with sqlite3.connect(settings.db_path) as db:
        db.execute(
            "INSERT INTO conversations (id, title, system, created, updated, seq, key_id) "
            "VALUES (?, 'p0001', NULL, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM conversations), ?)",
            (conversation_id, ts, ts, owner),
        )
        db.executemany(
            "INSERT INTO turns (conversation_id, n, prompt, response, exchange_id, ts) VALUES (?, ?, ?, ?, ?, ?)",
            [(conversation_id, n, *turn_text(n), f"ex{n}", ts) for n in range(1, count + 1)],
        )


def chat_messages(fake: FakeOllama) -> list[tuple[str, str]]:
    """The messages of the last prompt sent upstream, as (role, content) pairs."""
    return [(m["role"], m["content"]) for m in fake.requests[-1]["messages"]]


def latest_turns(last: int, count: int) -> list[tuple[str, str]]:
    pairs = []
    for n in range(last - count + 1, last + 1):
        prompt, response = turn_text(n)
        pairs += [("user", prompt), ("assistant", response)]
    return pairs


@contextmanager
def vm_steps(store: SqliteConversations) -> Iterator[list[int]]:
    """Count the SQLite virtual-machine instructions the store's connection runs: work done, with no clock."""
    steps = [0]

    def step() -> int:
        steps[0] += 1
        return 0  # go on

    with store._lock:
        store._db.set_progress_handler(step, 1)
    try:
        yield steps
    finally:
        with store._lock:
            store._db.set_progress_handler(None, 1)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings that pick the store: SQLite files, or a fresh PostgreSQL database."""
    return {} if request.param == "sqlite" else {"database_url": request.getfixturevalue("pg_url")}


def settings_for(fake_server: RunningServer, tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(ollama_base_url=fake_server.url, log_path=tmp_path / "logs" / "log.jsonl",
                         max_turns=MAX_TURNS, **overrides)  # fmt: skip


@contextmanager
def served(settings: Settings) -> Iterator[tuple[RunningServer, Any]]:
    app = create_app(settings)
    with serve_in_thread(app) as server:
        yield server, app


# -- a prompt reads only what it can send ------------------------------------------------------------------


def test_a_prompt_in_a_long_conversation_reads_and_sends_only_the_latest_turns(
    fake_server: RunningServer, fake: FakeOllama, tmp_path: Path
) -> None:
    settings = settings_for(fake_server, tmp_path)
    add_turns(settings, "long", TURNS)
    add_turns(settings, "short", MAX_TURNS + 5)
    steps: dict[str, int] = {}
    with served(settings) as (server, app), httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/conversations/short").status_code == 200  # the app is up, its store open
        store = app.state.service.memory.store
        for name in ("short", "long"):
            with vm_steps(store) as counted:
                answered = client.post("/generate", json={"prompt": f"next in {name}", "conversation_id": name})
            assert answered.status_code == 200
            steps[name] = counted[0]
            sent = chat_messages(fake)
            last = TURNS if name == "long" else MAX_TURNS + 5
            assert sent == [*latest_turns(last, MAX_TURNS), ("user", f"next in {name}")]

    # The prompt's database work does not grow with the conversation: 60 times the turns, the same work
    # (reading every turn, as before, took about 38 times as many steps here).
    assert steps["long"] <= steps["short"] * 1.1, steps


async def test_the_stores_context_query_reads_at_most_max_turns_rows(database: dict[str, Any], tmp_path: Path) -> None:
    settings = make_settings(log_path=tmp_path / "log.jsonl", **database)
    url = settings.database_url.get_secret_value() if settings.database_url is not None else None
    if url is not None:
        store: SqliteConversations | PgConversations = PgConversations(url)
        await store.open()
    else:
        store = SqliteConversations(settings.db_path)
    try:
        add_turns(settings, "long", TURNS, KEY_A)
        latest = await store.recent("long", MAX_TURNS, 10_000)
        fitting = await store.recent("long", MAX_TURNS, 55)  # each turn is 10 characters: 5 fit
        none = await store.recent("long", 0, 10_000)
        missing = await store.recent("nope", MAX_TURNS, 10_000)
        if isinstance(store, PgConversations):
            with psycopg.connect(url) as db:
                (plan,) = db.execute(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) {RECENT}", (MAX_TURNS, MAX_TURNS, 10_000, "long")
                ).fetchone()
            read = [node["Actual Rows"] * node["Actual Loops"] for node in _nodes(plan[0]["Plan"])
                    if node.get("Relation Name") == "turns"]  # fmt: skip
            assert sorted(read) == [1, MAX_TURNS]  # the newest turn's number, then MAX_TURNS turns
        else:
            add_turns(settings, "short", MAX_TURNS + 5)
            with vm_steps(store) as short:
                await store.recent("short", MAX_TURNS, 10_000)
            with vm_steps(store) as long:
                await store.recent("long", MAX_TURNS, 10_000)
            assert long[0] <= short[0] * 1.05, (long, short)
    finally:
        await store.aclose()

    assert latest is not None and (latest.key_id, latest.title) == (key_id(KEY_A), "p0001")
    assert [(t.prompt, t.n) for t in latest.turns] == [
        (f"p{n:04d}", n) for n in range(TURNS - MAX_TURNS + 1, TURNS + 1)
    ]
    assert fitting is not None and [t.n for t in fitting.turns] == [1496, 1497, 1498, 1499, 1500]
    assert none is not None and none.turns == []
    assert missing is None


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


# -- GET /conversations/{id} pages its turns ----------------------------------------------------------------


def every_turn(client: httpx.Client, conversation_id: str, between: Callable[[], None] = lambda: None,
               **params: Any) -> tuple[list[str], int]:  # fmt: skip
    """Every turn's prompt, page by page (calling `between()` after each), and the number of pages."""
    seen: list[str] = []
    cursor, pages = None, 0
    while True:
        page = client.get(
            f"/conversations/{conversation_id}", params={**params, **({"cursor": cursor} if cursor else {})}
        )
        assert page.status_code == 200, page.text
        pages += 1
        seen += [turn["prompt"] for turn in page.json()["turns"]]
        if (cursor := page.json()["next_cursor"]) is None:
            return seen, pages
        between()


def test_a_long_conversation_is_read_a_page_at_a_time_with_a_stable_cursor(
    fake_server: RunningServer, database: dict[str, Any], tmp_path: Path
) -> None:
    settings = settings_for(fake_server, tmp_path, **database)
    add_turns(settings, "long", TURNS)
    everything = [turn_text(n)[0] for n in range(1, TURNS + 1)]
    with served(settings) as (server, _), httpx.Client(base_url=server.url, timeout=10) as client:
        first = client.get("/conversations/long")
        by_500, pages_of_500 = every_turn(client, "long", limit=500)
        added: list[int] = []

        def add_one() -> None:  # a new turn arrives while a client pages through the old ones
            if not added:
                added.append(client.post("/generate", json={"prompt": "late", "conversation_id": "long"}).status_code)

        by_100, pages_of_100 = every_turn(client, "long", between=add_one)
        refused = [client.get("/conversations/long", params=params) for params in
                   ({"limit": 501}, {"limit": 0}, {"cursor": "abc"}, {"cursor": "-1"})]  # fmt: skip

    body = first.json()
    assert (len(body["turns"]), body["turn_count"], body["next_cursor"]) == (100, TURNS, "100")
    assert [t["prompt"] for t in body["turns"]] == everything[:100]
    assert body["turns"][0] == {"prompt": "p0001", "response": "r0001", "exchange_id": "ex1",
                                "ts": "2026-11-29T21:41:09.120Z"}  # fmt: skip
    assert len(first.content) < 20_000  # a page, not the whole conversation
    assert (by_500, pages_of_500) == (everything, 3)
    # Each turn exactly once, in order, and the one added meanwhile at the end.
    assert added == [200]
    assert (by_100, pages_of_100) == ([*everything, "late"], 16)
    assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == [(422, "invalid_request")] * 4


# -- each key sees its own ----------------------------------------------------------------------------------


async def test_an_ordinary_key_sees_continues_and_deletes_only_its_own_conversations(
    fake_server: RunningServer, fake: FakeOllama, database: dict[str, Any], tmp_path: Path
) -> None:
    settings = settings_for(fake_server, tmp_path, api_keys=f"{KEY_A},{KEY_B}", admin_keys=ROOT, **database)
    with served(settings) as (server, _):
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            a = as_key(KEY_A)
            made = (await client.post("/conversations", json={"system": "Be brief."}, headers=a)).json()["id"]
            assert (await client.post("/generate", json={"prompt": "secret of a", "conversation_id": made},
                                      headers=a)).status_code == 200  # fmt: skip
            # A prompt with a new id makes a conversation too, owned by its key.
            assert (await client.post("/generate", json={"prompt": "also a", "conversation_id": "a-named"},
                                      headers=a)).status_code == 200  # fmt: skip
            asked = len(fake.requests)

            b = as_key(KEY_B)
            b_list = (await client.get("/conversations", headers=b)).json()
            b_reads = [await client.get(f"/conversations/{c}", headers=b) for c in (made, "a-named")]
            b_rest = await client.post("/generate", json={"prompt": "give", "conversation_id": made}, headers=b)
            streamed = {"prompt": "give", "conversation_id": made, "stream": True}
            async with client.stream("POST", "/generate", json=streamed, headers=b) as b_sse:
                await b_sse.aread()
            b_ws = await ws_answer(server, KEY_B, {"prompt": "give", "conversation_id": made})
            b_delete = await client.delete(f"/conversations/{made}", headers=b)
            sent_for_b = len(fake.requests) - asked
            b_own = await client.post("/generate", json={"prompt": "mine", "conversation_id": "b-1"}, headers=b)

            a_list = (await client.get("/conversations", headers=a)).json()
            a_read = (await client.get(f"/conversations/{made}", headers=a)).json()
            a_reads_b = await client.get("/conversations/b-1", headers=a)
            a_ws = await ws_answer(server, KEY_A, {"prompt": "by ws", "conversation_id": made})

            root = as_key(ROOT)
            root_list = (await client.get("/conversations", headers=root)).json()
            root_read = await client.get(f"/conversations/{made}", headers=root)
            root_continues = await client.post("/generate", json={"prompt": "admin here", "conversation_id": made},
                                               headers=root)  # fmt: skip
            a_after_root = (await client.get(f"/conversations/{made}", headers=a)).json()
            root_deletes = await client.delete("/conversations/b-1", headers=root)
            b_after = (await client.get("/conversations", headers=b)).json()

    assert b_list == {"items": [], "next_cursor": None}
    for refused in (*b_reads, b_rest, b_sse, b_delete, a_reads_b):
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "not_found"
    assert "no conversation with id" in b_rest.json()["error"]["message"]
    assert b_ws == {"type": "error", "code": "not_found",
                    "message": f"no conversation with id {made!r}; GET /conversations lists them"}  # fmt: skip
    assert sent_for_b == 0  # nothing of A's reached the model for B
    assert b_own.status_code == 200

    assert [item["id"] for item in a_list["items"]] == ["a-named", made]
    assert [t["prompt"] for t in a_read["turns"]] == ["secret of a"]
    assert a_ws["type"] == "done"
    assert [item["id"] for item in root_list["items"]] == [made, "b-1", "a-named"]  # every key's, newest first
    assert root_read.status_code == 200
    assert root_continues.status_code == 200
    assert chat_messages(fake)[:2] == [("system", "Be brief."), ("user", "secret of a")]
    # The admin's turn joined A's conversation, which is still A's.
    assert [t["prompt"] for t in a_after_root["turns"]] == ["secret of a", "by ws", "admin here"]
    assert root_deletes.status_code == 204 and b_after["items"] == []


async def ws_answer(server: RunningServer, key: str, frame: dict[str, Any]) -> dict[str, Any]:
    """The websocket's last frame for one prompt (`done`, or the error), without the id and model fields."""
    async with connect(f"{server.ws_url}/ws/generate", additional_headers=as_key(key)) as ws:
        await ws.send(json.dumps(frame))
        while (received := json.loads(await ws.recv()))["type"] not in ("done", "error"):
            pass
    return {k: v for k, v in received.items() if k in ("type", "code", "message")}


def test_a_conversation_made_with_auth_off_is_only_for_admin_keys_once_keys_are_set(
    fake_server: RunningServer, tmp_path: Path
) -> None:
    open_settings = settings_for(fake_server, tmp_path)
    with served(open_settings) as (server, _), httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.post("/generate", json={"prompt": "before keys", "conversation_id": "old"}).status_code == 200
    keyed = settings_for(fake_server, tmp_path, api_keys=KEY_A, admin_keys=ROOT)
    with served(keyed) as (server, _), httpx.Client(base_url=server.url, timeout=10) as client:
        a_list = client.get("/conversations", headers=as_key(KEY_A)).json()
        a_read = client.get("/conversations/old", headers=as_key(KEY_A))
        a_continue = client.post("/generate", json={"prompt": "x", "conversation_id": "old"}, headers=as_key(KEY_A))
        root_read = client.get("/conversations/old", headers=as_key(ROOT))
    with served(open_settings) as (server, _), httpx.Client(base_url=server.url, timeout=10) as client:
        # Auth off again: one person on their own machine sees everything.
        open_read = client.get("/conversations/old")

    assert a_list["items"] == []
    assert (a_read.status_code, a_continue.status_code) == (404, 404)
    assert [t["prompt"] for t in root_read.json()["turns"]] == ["before keys"]
    assert open_read.status_code == 200


# -- older databases gain owners ----------------------------------------------------------------------------


_OLD_SQLITE = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT, system TEXT, created TEXT NOT NULL,
                            updated TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE turns (conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
                    n INTEGER NOT NULL, prompt TEXT NOT NULL, response TEXT NOT NULL, exchange_id TEXT NOT NULL,
                    ts TEXT NOT NULL, PRIMARY KEY (conversation_id, n));
INSERT INTO conversations VALUES ('old', 'hi', NULL, '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z', 1);
INSERT INTO turns VALUES ('old', 1, 'hi', 'hello', 'ex1', '2026-01-01T00:00:00.000Z');
"""


async def test_a_sqlite_file_from_before_owners_opens_with_its_conversations_ownerless(tmp_path: Path) -> None:
    path = tmp_path / "minivault.db"
    with sqlite3.connect(path) as db:
        db.executescript(_OLD_SQLITE)
    store = SqliteConversations(path)
    again = SqliteConversations(path)  # a second opening finds the column there
    try:
        old = await store.get("old")
        await store.append("new", turn=_turn("mine"), key_id="k1")
        mine, listed = await store.list(10, visible_to="k1"), await store.list(10)
    finally:
        await store.aclose()
        await again.aclose()

    assert old is not None and (old.key_id, [t.prompt for t in old.turns], old.turn_count) == (None, ["hi"], 1)
    assert [c.id for c in mine[0]] == ["new"]
    assert [(c.id, c.key_id) for c in listed[0]] == [("new", "k1"), ("old", None)]


async def test_a_postgresql_database_of_schema_1_is_migrated_with_its_conversations_ownerless(pg_url: str) -> None:
    store = PgConversations(pg_url)
    await store.open()
    await store.aclose()
    with psycopg.connect(pg_url, autocommit=True) as db:  # back to what schema 1 made
        db.execute("DROP INDEX conversations_by_key")
        db.execute("ALTER TABLE conversations DROP COLUMN key_id")
        db.execute("UPDATE minivault_schema SET version = 1")
        db.execute("INSERT INTO conversations (id, title, system, created, updated, seq) VALUES "
                   "('old', 'hi', NULL, '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z', 1)")  # fmt: skip
    store = PgConversations(pg_url)
    await store.open()
    try:
        old = await store.get("old")
        hidden = await store.get("old", visible_to="k1")
    finally:
        await store.aclose()
    with psycopg.connect(pg_url) as db:
        version = db.execute("SELECT version FROM minivault_schema").fetchall()

    assert old is not None and (old.key_id, old.turn_count) == (None, 0)
    assert hidden is None
    assert version == [(SCHEMA_VERSION,)] and SCHEMA_VERSION == 2


def _turn(prompt: str) -> Turn:
    return Turn(prompt, "answer", "ex-" + prompt, "2026-01-01T00:00:00.000Z")
