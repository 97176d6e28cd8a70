"""Admission control: at most N generations upstream at once, a bounded FIFO queue behind them, and no
key holding more than its share of the queue (MINIVAULT_MAX_QUEUE_PER_KEY), so one key's burst cannot
lock the others out.

`Admission` keeps both in this process; `app.admission.redis_slots.RedisAdmission` shares them between
replicas through Redis. Both have the async interface `AdmissionControl` describes.
"""

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

from app.errors import Busy, QueueShareExceeded


class Ticket:
    """A place in the queue, held by `key` (a key_id; None: auth is off); `changed` is set whenever the
    place moves or turns into a slot."""

    __slots__ = ("admitted", "changed", "key")

    def __init__(self, key: str | None = None) -> None:
        self.admitted = False
        self.changed = asyncio.Event()
        self.key = key


class AdmissionControl(Protocol):
    """What the generation service asks of a limiter: a slot now, else a place in the queue until one frees.

    A slot is not tied to a caller: whoever holds one gives one back with `release`.
    """

    async def try_enter(self) -> bool:
        """Take a slot at once if one is free and nobody waits."""
        ...

    async def enqueue(self, key: str | None) -> Ticket:
        """Join the queue for `key` (a key_id, None when auth is off), or raise Busy (429) at once when the
        queue is full or the key holds its share (QueueShareExceeded)."""
        ...

    async def position(self, ticket: Ticket) -> int:
        """1 for the head of the queue; 0 once admitted."""
        ...

    async def leave(self, ticket: Ticket) -> None:
        """Give up a place; a slot already handed over is passed on."""
        ...

    async def release(self, seconds: float | None = None) -> None:
        """Free a slot held for `seconds` (None: the generation never started)."""
        ...

    def retry_after(self) -> int:
        """Seconds until a slot is likely free, for Retry-After."""
        ...


class Admission:
    """Hands out `limit` slots; up to `max_queue` callers wait for one in arrival order, at most
    `max_per_key` of them (None: no share) with the same key.

    Not thread-safe: it lives on the event loop, like everything that calls it. A slot freed
    while callers wait goes straight to the first of them, so nobody can overtake the queue.
    `on_change(running, waiting)` is told every change (for the metrics gauges). The methods
    are async for the interface's sake but never suspend, so a cancelled caller cannot be cut
    off half-way through one.
    """

    def __init__(
        self,
        limit: int,
        max_queue: int,
        on_change: Callable[[int, int], None] | None = None,
        max_per_key: int | None = None,
    ) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.max_per_key = max_per_key
        self.running = 0
        self._waiting: deque[Ticket] = deque()
        # Places held per key; a key holding none has no entry, so the dict stays as small as the queue.
        self._held: dict[str | None, int] = {}
        self._on_change = on_change
        # Recent generation time, for an honest Retry-After.
        self._mean_seconds = 1.0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def try_enter(self) -> bool:
        """Take a slot at once if one is free and nobody waits; the fast path."""
        if self.running < self.limit and not self._waiting:
            self.running += 1
            self._changed()
            return True
        return False

    async def enqueue(self, key: str | None = None) -> Ticket:
        """Join the queue for `key`, or raise Busy (429) at once when it is full or the key holds its share."""
        if len(self._waiting) >= self.max_queue:
            raise busy(self.running, len(self._waiting), self.limit, self.max_queue, self.retry_after())
        held = self._held.get(key, 0)
        if self.max_per_key is not None and held >= self.max_per_key:
            raise share_exceeded(key, held, self.max_per_key, self.retry_after())
        ticket = Ticket(key)
        self._waiting.append(ticket)
        self._held[key] = held + 1
        self._changed()
        return ticket

    async def position(self, ticket: Ticket) -> int:
        """1 for the head of the queue; 0 once admitted."""
        return 0 if ticket.admitted else self._waiting.index(ticket) + 1

    async def leave(self, ticket: Ticket) -> None:
        """Give up a place (the client left, or was cut off); a slot already handed over is passed on."""
        if ticket.admitted:
            await self.release()
            return
        self._waiting.remove(ticket)
        self._unhold(ticket)
        self._moved()
        self._changed()

    async def release(self, seconds: float | None = None) -> None:
        """Free a slot: the head of the queue gets it, else it goes back to the pool."""
        if seconds is not None:
            self._mean_seconds += (seconds - self._mean_seconds) * 0.1
        if self._waiting:
            ticket = self._waiting.popleft()
            self._unhold(ticket)
            ticket.admitted = True
            ticket.changed.set()
            self._moved()
        else:
            self.running -= 1
        self._changed()

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, at the recent pace, at least 1."""
        return retry_after(len(self._waiting), self.limit, self._mean_seconds)

    def _unhold(self, ticket: Ticket) -> None:
        left = self._held[ticket.key] - 1
        if left:
            self._held[ticket.key] = left
        else:
            del self._held[ticket.key]

    def _moved(self) -> None:
        for ticket in self._waiting:
            ticket.changed.set()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.running, len(self._waiting))


def retry_after(waiting: int, limit: int, mean_seconds: float) -> int:
    """The queue ahead plus one, `limit` at a time, at `mean_seconds` each; between 1 and 60."""
    rounds = (waiting + 1) / limit
    return max(1, min(60, math.ceil(rounds * mean_seconds)))


def share_exceeded(key: str | None, held: int, max_per_key: int, retry_after: int) -> QueueShareExceeded:
    """The 429 a key gets when it already holds its share of the queue; other keys still get places."""
    who = "this API key already holds" if key is not None else "prompts without an API key already hold"
    return QueueShareExceeded(
        f"{who} {held} places in MiniVault's queue, a key's share (MINIVAULT_MAX_QUEUE_PER_KEY={max_per_key}); "
        f"wait for those prompts to start, and retry after {retry_after} s",
        retry_after,
    )


def busy(running: int, waiting: int, limit: int, max_queue: int, retry_after: int) -> Busy:
    """The 429 a full queue answers with."""
    return Busy(
        f"MiniVault is busy: {running} generations are running and {waiting} are queued "
        f"(MINIVAULT_MAX_CONCURRENCY={limit}, MINIVAULT_MAX_QUEUE={max_queue}); retry after {retry_after} s",
        retry_after,
    )
