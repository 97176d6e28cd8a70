"""The two storage interfaces: exchange history and conversations.

Routes and the generation service see only these; SQLite implements them today (one file,
MINIVAULT_DB_PATH), and a PostgreSQL implementation for several replicas can replace it
without touching either. Every method that touches the database runs off the event loop.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from app.schemas import Endpoint, ExchangeRecord, Status


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


@dataclass(slots=True)
class HistoryPage:
    """Newest first (or best match first with `q`); `next_cursor` is None on the last page."""

    items: list[ExchangeRecord]
    next_cursor: str | None


class HistoryStore(Protocol):
    """Every finished exchange, searchable. `consume` is the exchange-consumer side: it must not block."""

    def consume(self, record: ExchangeRecord) -> None: ...

    async def search(self, query: HistoryQuery) -> HistoryPage: ...

    async def get(self, exchange_id: str) -> ExchangeRecord | None: ...

    async def stats(self, since: datetime | None = None, until: datetime | None = None) -> list[dict[str, Any]]:
        """Per model and UTC day: count, ok/error/cancelled counts, token sums, latency p50/p90/p99."""
        ...

    def add_many(self, records: Iterable[ExchangeRecord]) -> int:
        """Insert records that are not there yet (by start time and id) and return how many were new; blocking."""
        ...

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every record consumed so far is written."""
        ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class Turn:
    """One exchange of a conversation: what the user said and the whole answer."""

    prompt: str
    response: str
    exchange_id: str
    ts: str


@dataclass(slots=True)
class Conversation:
    id: str
    title: str | None
    system: str | None
    created: str
    updated: str
    turns: list[Turn] = field(default_factory=list)


class ConversationStore(Protocol):
    """Conversations and their turns, oldest turn first."""

    async def create(self, conversation_id: str | None = None, system: str | None = None) -> Conversation: ...

    async def get(self, conversation_id: str) -> Conversation | None:
        """The conversation with all its turns, or None."""
        ...

    async def list(self, limit: int, cursor: str | None = None) -> tuple[list[Conversation], str | None]:
        """Newest (last updated) first, without turns; and the cursor of the next page."""
        ...

    async def delete(self, conversation_id: str) -> bool: ...

    async def append(self, conversation_id: str, turn: Turn, system: str | None = None) -> None:
        """Add a finished turn, creating the conversation (titled by its first prompt) when it is new."""
        ...

    async def aclose(self) -> None: ...
