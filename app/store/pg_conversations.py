"""Conversations in PostgreSQL, shared by replicas, with a lock that serializes one conversation's prompts
across all of them (a session-level advisory lock, held on a pooled connection of its own)."""

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.store.base import Conversation, Turn
from app.store.pg_schema import PgUnavailable, describe, migrate

logger = logging.getLogger(__name__)

_TITLE_CHARS = 80
_CHANGE = "nextval('conversation_changes')"
_COLUMNS = "c.id, c.title, c.system, c.created, c.updated, c.key_id"
# With an ordinary key's key_id as a parameter: only the conversations that key made.
_MINE = " AND c.key_id = %s"
# A prompt's context, in one statement with the conversation itself: its latest turns, newest first, while
# their running total of characters fits, so only the rows a prompt can send are read. Turns are numbered
# 1, 2, … with no gaps, so the range on n bounds the rows read whatever the plan: without statistics (or
# with many short conversations) the planner picks a bitmap scan that reads and sorts every turn of the
# conversation. Parameters: the most turns (twice), the most characters, the conversation's id.
RECENT = (
    f"SELECT {_COLUMNS}, t.prompt, t.response, t.exchange_id, t.ts, t.n FROM conversations c "
    "LEFT JOIN LATERAL (SELECT * FROM (SELECT latest.*, "
    "sum(length(latest.prompt) + length(latest.response)) OVER (ORDER BY latest.n DESC) AS chars FROM "
    "(SELECT prompt, response, exchange_id, ts, n FROM turns WHERE conversation_id = c.id "
    "AND n > (SELECT COALESCE(max(n), 0) FROM turns WHERE conversation_id = c.id) - %s "
    "ORDER BY n DESC LIMIT %s) latest) sized WHERE sized.chars <= %s) t ON true "
    "WHERE c.id = %s ORDER BY t.n"
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: str) -> str:
    """PostgreSQL text cannot hold U+0000: it is kept as U+FFFD, the replacement character."""
    return value.replace("\x00", "\ufffd")


async def _unlock_all(db: AsyncConnection) -> None:
    await db.execute("SELECT pg_advisory_unlock_all()")


def lock_key(conversation_id: str) -> int:
    """The conversation's advisory lock key: 64 bits of a hash of its id (a collision only makes two
    conversations wait for each other)."""
    digest = hashlib.blake2b(conversation_id.encode(errors="surrogatepass"), digest_size=8, person=b"minivault-conv")
    return int.from_bytes(digest.digest(), "big", signed=True)


class PgConversations:
    """ConversationStore on PostgreSQL; `lock(id)` holds a conversation against every replica.

    Each held lock keeps one connection of the lock pool (`lock_connections`, beside `connections` for
    the queries) from the moment a prompt waits for its conversation until its answer is kept.
    """

    def __init__(
        self, conninfo: str, *, connections: int = 4, lock_connections: int = 16, connect_timeout: float = 10.0
    ) -> None:
        self.conninfo = conninfo
        self.where = describe(conninfo)
        self._connections = connections
        self._lock_connections = lock_connections
        self._connect_timeout = connect_timeout
        self._pool: AsyncConnectionPool | None = None
        self._locks: AsyncConnectionPool | None = None

    async def open(self) -> None:
        """Migrate the schema (in a thread) and open both pools; PgUnavailable when PostgreSQL cannot be had."""
        await asyncio.to_thread(migrate, self.conninfo, self._connect_timeout)
        self._pool = await self._open_pool("minivault-conversations", self._connections)
        # Whatever way a connection comes back (a waiter cancelled just as the server granted its lock, an
        # unlock that failed), it holds no lock when the pool hands it out again.
        self._locks = await self._open_pool("minivault-conversation-locks", self._lock_connections, _unlock_all)

    async def _open_pool(
        self, name: str, size: int, reset: Callable[[AsyncConnection], Awaitable[None]] | None = None
    ) -> AsyncConnectionPool:
        pool = AsyncConnectionPool(
            self.conninfo, min_size=1, max_size=size, open=False, name=name,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(self._connect_timeout)),
                    "application_name": "minivault"},
            check=AsyncConnectionPool.check_connection,  # a dropped connection is replaced, not handed out
            reset=reset,
        )  # fmt: skip
        try:
            await pool.open(wait=True, timeout=self._connect_timeout)
        except PoolTimeout as exc:
            await pool.close()
            raise PgUnavailable(f"cannot connect to PostgreSQL at {self.where} ({exc})") from exc
        return pool

    async def aclose(self) -> None:
        """Close both pools; a lock still held is freed when its connection comes back (and is closed)."""
        for pool in (self._pool, self._locks):
            if pool is not None:
                await pool.close()

    def _queries(self) -> AsyncConnectionPool:
        if self._pool is None:
            raise RuntimeError("PgConversations is not open: await open() first")
        return self._pool

    @asynccontextmanager
    async def lock(self, conversation_id: str) -> AsyncIterator[None]:
        """Hold the conversation until the block ends; another holder, on any replica, waits for it.

        The lock belongs to its database session: a replica that dies, or loses its connection, frees it.
        """
        if self._locks is None:
            raise RuntimeError("PgConversations is not open: await open() first")
        key = lock_key(conversation_id)
        async with self._locks.connection() as db:
            await db.execute("SELECT pg_advisory_lock(%s)", (key,))
            try:
                yield
            finally:
                row = await (await db.execute("SELECT pg_advisory_unlock(%s)", (key,))).fetchone()
                if row is None or not row[0]:
                    logger.warning("conversation %r: its lock was no longer held (the session was reset)",
                                   conversation_id)  # fmt: skip

    async def create(
        self, conversation_id: str | None = None, system: str | None = None, key_id: str | None = None
    ) -> Conversation:
        conversation_id = conversation_id or uuid.uuid4().hex
        system = _text(system) if system is not None else None
        now = _now()
        async with self._queries().connection() as db:
            await db.execute(
                "INSERT INTO conversations (id, title, system, created, updated, seq, key_id) "
                f"VALUES (%s, NULL, %s, %s, %s, {_CHANGE}, %s)",
                (conversation_id, system, now, now, key_id),
            )
        return Conversation(conversation_id, None, system, now, now, key_id=key_id, turn_count=0)

    async def get(
        self, conversation_id: str, *, visible_to: str | None = None, after: int = 0, limit: int | None = None
    ) -> Conversation | None:
        # One statement: the conversation, its number of turns and a page of them from one snapshot. Turns are
        # numbered with no gaps: the range bounds the rows read whatever the plan (see RECENT).
        upto = after + limit if limit is not None else 2**31 - 1
        async with self._queries().connection() as db:
            rows = await (await db.execute(
                f"SELECT {_COLUMNS}, (SELECT count(*) FROM turns WHERE conversation_id = c.id), "
                "t.prompt, t.response, t.exchange_id, t.ts, t.n FROM conversations c LEFT JOIN LATERAL ("
                "SELECT prompt, response, exchange_id, ts, n FROM turns WHERE conversation_id = c.id AND n > %s "
                "AND n <= %s ORDER BY n LIMIT %s) t ON true "
                f"WHERE c.id = %s{_MINE if visible_to is not None else ''} ORDER BY t.n",
                (after, upto, limit, conversation_id, *((visible_to,) if visible_to is not None else ())),
            )).fetchall()  # fmt: skip
        if not rows:
            return None
        turns = [Turn(*row[7:]) for row in rows if row[7] is not None]
        return _conversation(rows[0][:6], turns, rows[0][6])

    async def recent(self, conversation_id: str, max_turns: int, max_chars: int) -> Conversation | None:
        async with self._queries().connection() as db:
            rows = await (await db.execute(RECENT, (max_turns, max_turns, max_chars, conversation_id))).fetchall()
        if not rows:
            return None
        return _conversation(rows[0][:6], [Turn(*row[6:11]) for row in rows if row[6] is not None])

    async def list(
        self, limit: int, cursor: str | None = None, *, visible_to: str | None = None
    ) -> tuple[list[Conversation], str | None]:
        """Most recently changed first. The cursor is the change number of the last one shown (digits)."""
        before = int(cursor) if cursor else 2**63 - 1
        mine = _MINE if visible_to is not None else ""
        async with self._queries().connection() as db:
            rows = await (await db.execute(
                f"SELECT {_COLUMNS}, c.seq FROM conversations c WHERE c.seq < %s{mine} ORDER BY c.seq DESC LIMIT %s",
                (before, *((visible_to,) if visible_to is not None else ()), limit + 1),
            )).fetchall()  # fmt: skip
        page, more = rows[:limit], len(rows) > limit
        return [_conversation(row[:6], []) for row in page], (str(page[-1][6]) if more else None)

    async def delete(self, conversation_id: str, *, visible_to: str | None = None) -> bool:
        mine = _MINE if visible_to is not None else ""
        async with self._queries().connection() as db:
            done = await db.execute(
                f"DELETE FROM conversations c WHERE c.id = %s{mine}",
                (conversation_id, *((visible_to,) if visible_to is not None else ())),
            )
            return done.rowcount > 0

    async def append(
        self, conversation_id: str, turn: Turn, system: str | None = None, key_id: str | None = None
    ) -> None:
        now = _now()
        title = " ".join(_text(turn.prompt).split())[:_TITLE_CHARS]
        async with self._queries().connection() as db, db.transaction():
            # The upsert locks the conversation's row until commit: a second append (from any replica)
            # waits here, then numbers its turn after this one. An existing conversation keeps its owner
            # (an admin key may continue another key's).
            await db.execute(
                "INSERT INTO conversations (id, title, system, created, updated, seq, key_id) VALUES (%s, %s, %s, "
                f"%s, %s, {_CHANGE}, %s) ON CONFLICT (id) DO UPDATE SET updated = excluded.updated, "
                "seq = excluded.seq, title = COALESCE(conversations.title, excluded.title), "
                "system = COALESCE(excluded.system, conversations.system)",
                (conversation_id, title, _text(system) if system is not None else None, now, now, key_id),
            )
            await db.execute(
                "INSERT INTO turns (conversation_id, n, prompt, response, exchange_id, ts) VALUES "
                "(%s, (SELECT COALESCE(max(n), 0) + 1 FROM turns WHERE conversation_id = %s), %s, %s, %s, %s)",
                (conversation_id, conversation_id, _text(turn.prompt), _text(turn.response), turn.exchange_id, turn.ts),
            )


def _conversation(row: Sequence[Any], turns: list[Turn], turn_count: int | None = None) -> Conversation:
    """A Conversation from (id, title, system, created, updated, key_id)."""
    conversation_id, title, system, created, updated, key_id = row
    return Conversation(conversation_id, title, system, created, updated, turns, key_id, turn_count)
