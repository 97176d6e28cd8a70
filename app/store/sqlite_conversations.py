"""Conversations in SQLite: one connection, used from worker threads under a lock (calls are short)."""

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from app.store.base import Conversation, Turn

T = TypeVar("T")
Row = tuple[Any, ...]
_TITLE_CHARS = 80
_NEXT_SEQ = "(SELECT COALESCE(MAX(seq), 0) + 1 FROM conversations)"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT,
    system TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    -- Grows with every change: the order of GET /conversations, and its cursor.
    seq INTEGER NOT NULL,
    -- The key_id of the key that made it; NULL when made with auth off.
    key_id TEXT
);
CREATE INDEX IF NOT EXISTS conversations_by_seq ON conversations (seq);
CREATE TABLE IF NOT EXISTS turns (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    exchange_id TEXT NOT NULL,
    ts TEXT NOT NULL,
    PRIMARY KEY (conversation_id, n)
);
"""
# After the tables exist (and have key_id, however old the file): one key's listing reads only its own.
_KEY_INDEX = "CREATE INDEX IF NOT EXISTS conversations_by_key ON conversations (key_id, seq)"
_CONVERSATION = "SELECT id, title, system, created, updated, key_id FROM conversations"
# The latest turns, newest first, while their running total of characters fits: only the rows a prompt can
# send are read. SQLite's length() stops at a U+0000, so the caller still trims to the exact count.
RECENT = """
SELECT prompt, response, exchange_id, ts, n FROM (
    SELECT *, SUM(length(prompt) + length(response)) OVER (ORDER BY n DESC) AS chars FROM (
        SELECT prompt, response, exchange_id, ts, n FROM turns WHERE conversation_id = ? ORDER BY n DESC LIMIT ?
    )
) WHERE chars <= ? ORDER BY n DESC
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SqliteConversations:
    """ConversationStore on a SQLite file (WAL, so the history store can share it)."""

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        _add_key_id(self._db)
        self._db.execute(_KEY_INDEX)
        self._lock = threading.Lock()

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work(self._db)

        return await asyncio.to_thread(locked)

    async def create(
        self, conversation_id: str | None = None, system: str | None = None, key_id: str | None = None
    ) -> Conversation:
        conversation_id = conversation_id or uuid.uuid4().hex
        now = _now()

        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO conversations (id, title, system, created, updated, seq, key_id) "
                f"VALUES (?, NULL, ?, ?, ?, {_NEXT_SEQ}, ?)",
                (conversation_id, system, now, now, key_id),
            )

        await self._run(insert)
        return Conversation(conversation_id, None, system, now, now, key_id=key_id, turn_count=0)

    async def get(
        self, conversation_id: str, *, visible_to: str | None = None, after: int = 0, limit: int | None = None
    ) -> Conversation | None:
        def read(db: sqlite3.Connection) -> Conversation | None:
            # Both reads under the connection's lock: no append comes between them.
            row = _read_conversation(db, conversation_id, visible_to)
            if row is None:
                return None
            (count,) = db.execute("SELECT COUNT(*) FROM turns WHERE conversation_id = ?", (conversation_id,)).fetchone()
            turns = [
                Turn(*turn)
                for turn in db.execute(
                    "SELECT prompt, response, exchange_id, ts, n FROM turns WHERE conversation_id = ? AND n > ? "
                    "ORDER BY n LIMIT ?",
                    (conversation_id, after, -1 if limit is None else limit),  # LIMIT -1: no limit
                )
            ]
            return _conversation(row, turns, count)

        return await self._run(read)

    async def recent(self, conversation_id: str, max_turns: int, max_chars: int) -> Conversation | None:
        def read(db: sqlite3.Connection) -> Conversation | None:
            row = _read_conversation(db, conversation_id, None)
            if row is None:
                return None
            newest_first = db.execute(RECENT, (conversation_id, max_turns, max_chars)).fetchall()
            return _conversation(row, [Turn(*turn) for turn in reversed(newest_first)])

        return await self._run(read)

    async def list(
        self, limit: int, cursor: str | None = None, *, visible_to: str | None = None
    ) -> tuple[list[Conversation], str | None]:
        """Most recently changed first. The cursor is the change number of the last one shown (digits)."""
        before = int(cursor) if cursor else 2**63 - 1
        # Two statements rather than `? IS NULL OR key_id = ?`, so a key's listing walks its own index.
        mine = "key_id = ? AND " if visible_to is not None else ""
        params = (visible_to, before, limit + 1) if visible_to is not None else (before, limit + 1)

        def read(db: sqlite3.Connection) -> list[tuple[Conversation, int]]:
            rows = db.execute(
                "SELECT id, title, system, created, updated, key_id, seq FROM conversations "
                f"WHERE {mine}seq < ? ORDER BY seq DESC LIMIT ?",
                params,
            )
            return [(_conversation(row[:6], []), row[6]) for row in rows]

        found = await self._run(read)
        page, more = found[:limit], len(found) > limit
        return [conversation for conversation, _ in page], (str(page[-1][1]) if more else None)

    async def delete(self, conversation_id: str, *, visible_to: str | None = None) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            if visible_to is None:
                return db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount > 0
            done = db.execute("DELETE FROM conversations WHERE id = ? AND key_id = ?", (conversation_id, visible_to))
            return done.rowcount > 0

        return await self._run(remove)

    async def append(
        self, conversation_id: str, turn: Turn, system: str | None = None, key_id: str | None = None
    ) -> None:
        now = _now()
        title = " ".join(turn.prompt.split())[:_TITLE_CHARS]

        def insert(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                # An existing conversation keeps its owner (an admin key may continue another key's).
                db.execute(
                    "INSERT INTO conversations (id, title, system, created, updated, seq, key_id) "
                    f"VALUES (?, ?, ?, ?, ?, {_NEXT_SEQ}, ?) "
                    "ON CONFLICT (id) DO UPDATE SET updated = excluded.updated, seq = excluded.seq, "
                    "title = COALESCE(conversations.title, excluded.title), "
                    "system = COALESCE(excluded.system, conversations.system)",
                    (conversation_id, title, system, now, now, key_id),
                )
                db.execute(
                    "INSERT INTO turns (conversation_id, n, prompt, response, exchange_id, ts) VALUES "
                    "(?, (SELECT COALESCE(MAX(n), 0) + 1 FROM turns WHERE conversation_id = ?), ?, ?, ?, ?)",
                    (conversation_id, conversation_id, turn.prompt, turn.response, turn.exchange_id, turn.ts),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(insert)

    async def aclose(self) -> None:
        await self._run(lambda db: db.close())


def _add_key_id(db: sqlite3.Connection) -> None:
    """A file made before conversations had owners gets the column; its conversations stay ownerless (NULL)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(conversations)")}
    if "key_id" in columns:
        return
    try:
        db.execute("ALTER TABLE conversations ADD COLUMN key_id TEXT")
    except sqlite3.OperationalError as exc:
        if "duplicate column" not in str(exc):  # another process opening the same file just added it
            raise


def _read_conversation(db: sqlite3.Connection, conversation_id: str, visible_to: str | None) -> Row | None:
    if visible_to is None:
        return db.execute(f"{_CONVERSATION} WHERE id = ?", (conversation_id,)).fetchone()
    return db.execute(f"{_CONVERSATION} WHERE id = ? AND key_id = ?", (conversation_id, visible_to)).fetchone()


def _conversation(row: Row, turns: list[Turn], turn_count: int | None = None) -> Conversation:
    """A Conversation from (id, title, system, created, updated, key_id)."""
    conversation_id, title, system, created, updated, key_id = row
    return Conversation(conversation_id, title, system, created, updated, turns, key_id, turn_count)
