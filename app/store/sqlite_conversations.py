"""Conversations in SQLite: one connection, used from worker threads under a lock (calls are short)."""

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from app.store.base import Conversation, Turn

T = TypeVar("T")
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
    seq INTEGER NOT NULL
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
        self._lock = threading.Lock()

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return work(self._db)

        return await asyncio.to_thread(locked)

    async def create(self, conversation_id: str | None = None, system: str | None = None) -> Conversation:
        conversation_id = conversation_id or uuid.uuid4().hex
        now = _now()

        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO conversations (id, title, system, created, updated, seq) "
                f"VALUES (?, NULL, ?, ?, ?, {_NEXT_SEQ})",
                (conversation_id, system, now, now),
            )

        await self._run(insert)
        return Conversation(conversation_id, None, system, now, now)

    async def get(self, conversation_id: str) -> Conversation | None:
        def read(db: sqlite3.Connection) -> Conversation | None:
            row = db.execute(
                "SELECT id, title, system, created, updated FROM conversations WHERE id = ?", (conversation_id,)
            ).fetchone()
            if row is None:
                return None
            turns = [
                Turn(*turn)
                for turn in db.execute(
                    "SELECT prompt, response, exchange_id, ts FROM turns WHERE conversation_id = ? ORDER BY n",
                    (conversation_id,),
                )
            ]
            return Conversation(*row, turns=turns)

        return await self._run(read)

    async def list(self, limit: int, cursor: str | None = None) -> tuple[list[Conversation], str | None]:
        """Most recently changed first. The cursor is the change number of the last one shown (digits)."""
        before = int(cursor) if cursor else None

        def read(db: sqlite3.Connection) -> list[tuple[Conversation, int]]:
            rows = db.execute(
                "SELECT id, title, system, created, updated, seq FROM conversations "
                "WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                (before if before is not None else 2**63 - 1, limit + 1),
            )
            return [(Conversation(*row[:5]), row[5]) for row in rows]

        found = await self._run(read)
        page, more = found[:limit], len(found) > limit
        return [conversation for conversation, _ in page], (str(page[-1][1]) if more else None)

    async def delete(self, conversation_id: str) -> bool:
        def remove(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount > 0

        return await self._run(remove)

    async def append(self, conversation_id: str, turn: Turn, system: str | None = None) -> None:
        now = _now()
        title = " ".join(turn.prompt.split())[:_TITLE_CHARS]

        def insert(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO conversations (id, title, system, created, updated, seq) "
                    f"VALUES (?, ?, ?, ?, ?, {_NEXT_SEQ}) "
                    "ON CONFLICT (id) DO UPDATE SET updated = excluded.updated, seq = excluded.seq, "
                    "title = COALESCE(conversations.title, excluded.title), "
                    "system = COALESCE(excluded.system, conversations.system)",
                    (conversation_id, title, system, now, now),
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
