"""The two storage interfaces: exchange history and conversations.

Routes and the generation service see only these; SQLite implements them today (one file,
MINIVAULT_DB_PATH), and a PostgreSQL implementation for several replicas can replace it
without touching either. Every method that touches the database runs off the event loop.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from app.schemas import Endpoint, ExchangeRecord, Status

if TYPE_CHECKING:
    from app.exchanges.batch_writer import FollowedLog


@dataclass(slots=True, kw_only=True)
class HistoryQuery:
    """Filters for GET /history; `q` is an FTS5 query over prompt and response (words, `pre*`, "phrases")."""

    q: str | None = None
    model: str | None = None
    status: Status | None = None
    endpoint: Endpoint | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 50
    cursor: str | None = None
    # Only this key's exchanges (an ordinary key's view); None: every key's (an admin key, or auth off).
    key_id: str | None = None


@dataclass(slots=True)
class HistoryPage:
    """Newest first (or best match first with `q`); `next_cursor` is None on the last page."""

    items: list[ExchangeRecord]
    next_cursor: str | None


class HistoryStore(Protocol):
    """Every finished exchange, searchable. `consume` is the exchange-consumer side: it must not block."""

    def consume(self, record: ExchangeRecord) -> None: ...

    async def search(self, query: HistoryQuery) -> HistoryPage: ...

    async def get(self, exchange_id: str, key_id: str | None = None) -> ExchangeRecord | None:
        """The exchange (the latest under a reused id); with `key_id`, None unless that key made it."""
        ...

    async def stats(
        self, since: datetime | None = None, until: datetime | None = None, key_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Per model and UTC day: count, ok/error/cancelled counts, token sums, latency p50/p90/p99 (of
        `key_id`'s exchanges only, when given)."""
        ...

    def add_many(self, records: Iterable[ExchangeRecord]) -> int:
        """Insert records that are not there yet (by start time and id) and return how many were new; blocking."""
        ...

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every record consumed so far is written."""
        ...

    def follow(self, log: "FollowedLog") -> None:
        """Write only the exchanges `log` (the interaction log) has written: the log comes first."""
        ...

    def bound_queue(self, max_bytes: int, on_summarized: Callable[[int], None] | None = None) -> None:
        """Hold at most `max_bytes` of unwritten records; past it, refusals are counted, not stored."""
        ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class Turn:
    """One exchange of a conversation: what the user said and the whole answer."""

    prompt: str
    response: str
    exchange_id: str
    ts: str
    # Its number in the conversation (1, 2, …), set when read back: the cursor of a page of turns.
    n: int | None = None


@dataclass(slots=True)
class Conversation:
    id: str
    title: str | None
    system: str | None
    created: str
    updated: str
    turns: list[Turn] = field(default_factory=list)
    # The key that made it (None: made with auth off, so only admin keys see it once keys are set).
    key_id: str | None = None
    # All its turns, however few were read; None where it was not counted (listings).
    turn_count: int | None = None


class ConversationStore(Protocol):
    """Conversations and their turns, oldest turn first.

    `visible_to` is the key_id of an ordinary key, which sees only the conversations it made; None sees
    them all (an admin key, or auth off). Another key's conversation is then None, False or absent, as
    if it did not exist.
    """

    async def create(
        self, conversation_id: str | None = None, system: str | None = None, key_id: str | None = None
    ) -> Conversation:
        """A new conversation owned by `key_id` (None with auth off)."""
        ...

    async def get(
        self, conversation_id: str, *, visible_to: str | None = None, after: int = 0, limit: int | None = None
    ) -> Conversation | None:
        """The conversation with its turns numbered above `after` (at most `limit` of them; all when None), or None."""
        ...

    async def recent(self, conversation_id: str, max_turns: int, max_chars: int) -> Conversation | None:
        """The conversation with only its latest turns, at most `max_turns` of them holding at most
        `max_chars` characters (oldest first), whoever owns it; None when there is no such conversation."""
        ...

    async def list(
        self, limit: int, cursor: str | None = None, *, visible_to: str | None = None
    ) -> tuple[list[Conversation], str | None]:
        """Newest (last updated) first, without turns; and the cursor of the next page."""
        ...

    async def delete(self, conversation_id: str, *, visible_to: str | None = None) -> bool: ...

    async def append(
        self, conversation_id: str, turn: Turn, system: str | None = None, key_id: str | None = None
    ) -> None:
        """Add a finished turn, creating the conversation (titled by its first prompt, owned by `key_id`) when it
        is new; an existing conversation keeps its owner."""
        ...

    async def aclose(self) -> None: ...
