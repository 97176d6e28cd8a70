"""Conversations in PostgreSQL, shared by replicas, with a lock that serializes one conversation's prompts
across all of them (a session-level advisory lock, held on a pooled connection of its own)."""

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.store.base import Conversation, Turn
from app.store.pg_schema import PgUnavailable, describe, migrate

logger = logging.getLogger(__name__)

_TITLE_CHARS = 80
_CHANGE = "nextval('conversation_changes')"


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

    async def create(self, conversation_id: str | None = None, system: str | None = None) -> Conversation:
        conversation_id = conversation_id or uuid.uuid4().hex
        system = _text(system) if system is not None else None
        now = _now()
        async with self._queries().connection() as db:
            await db.execute(
                f"INSERT INTO conversations (id, title, system, created, updated, seq) VALUES (%s, NULL, %s, %s, %s, "
                f"{_CHANGE})",
                (conversation_id, system, now, now),
            )
        return Conversation(conversation_id, None, system, now, now)

    async def get(self, conversation_id: str) -> Conversation | None:
        # One statement: the conversation and its turns from one snapshot.
        async with self._queries().connection() as db:
            rows = await (await db.execute(
                "SELECT c.id, c.title, c.system, c.created, c.updated, t.prompt, t.response, t.exchange_id, t.ts "
                "FROM conversations c LEFT JOIN turns t ON t.conversation_id = c.id WHERE c.id = %s ORDER BY t.n",
                (conversation_id,),
            )).fetchall()  # fmt: skip
        if not rows:
            return None
        turns = [Turn(*row[5:]) for row in rows if row[5] is not None]
        return Conversation(*rows[0][:5], turns=turns)

    async def list(self, limit: int, cursor: str | None = None) -> tuple[list[Conversation], str | None]:
        """Most recently changed first. The cursor is the change number of the last one shown (digits)."""
        before = int(cursor) if cursor else 2**63 - 1
        async with self._queries().connection() as db:
            rows = await (await db.execute(
                "SELECT id, title, system, created, updated, seq FROM conversations WHERE seq < %s "
                "ORDER BY seq DESC LIMIT %s",
                (before, limit + 1),
            )).fetchall()  # fmt: skip
        page, more = rows[:limit], len(rows) > limit
        return [Conversation(*row[:5]) for row in page], (str(page[-1][5]) if more else None)

    async def delete(self, conversation_id: str) -> bool:
        async with self._queries().connection() as db:
            done = await db.execute("DELETE FROM conversations WHERE id = %s", (conversation_id,))
            return done.rowcount > 0

    async def append(self, conversation_id: str, turn: Turn, system: str | None = None) -> None:
        now = _now()
        title = " ".join(_text(turn.prompt).split())[:_TITLE_CHARS]
        async with self._queries().connection() as db, db.transaction():
            # The upsert locks the conversation's row until commit: a second append (from any replica)
            # waits here, then numbers its turn after this one.
            await db.execute(
                f"INSERT INTO conversations (id, title, system, created, updated, seq) VALUES (%s, %s, %s, %s, %s, "
                f"{_CHANGE}) ON CONFLICT (id) DO UPDATE SET updated = excluded.updated, seq = excluded.seq, "
                "title = COALESCE(conversations.title, excluded.title), "
                "system = COALESCE(excluded.system, conversations.system)",
                (conversation_id, title, _text(system) if system is not None else None, now, now),
            )
            await db.execute(
                "INSERT INTO turns (conversation_id, n, prompt, response, exchange_id, ts) VALUES "
                "(%s, (SELECT COALESCE(max(n), 0) + 1 FROM turns WHERE conversation_id = %s), %s, %s, %s, %s)",
                (conversation_id, conversation_id, _text(turn.prompt), _text(turn.response), turn.exchange_id, turn.ts),
            )
