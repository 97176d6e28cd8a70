"""Admission shared by every replica using one Redis: the fleet-wide slots and FIFO queue, as leases.

Redis holds three sorted sets: `slots` (id -> lease expiry), `queue` (id -> arrival number) and
`places` (id -> lease expiry of each queue place), and two hashes for the per-key share of the
queue: `owners` (queued id -> its key_id) and `shares` (key_id -> places it holds). Every step is one
Lua script, so counts are exact however many replicas call at once, and each script first drops
the leases nobody renewed (their replica died, and its places no longer count against its keys)
and hands free slots to the head of the queue, the ticket's id becoming the slot's. A replica
renews the leases it holds every third of MINIVAULT_SLOT_LEASE_SECONDS. When the queue moves,
the script publishes on a channel; each replica with waiters then asks where they
stand (one script for all of them), and asks anyway every few seconds in case a message was lost.
Times are Redis's own (TIME), so replicas' clocks never matter.
"""

import asyncio
import itertools
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from app.admission.rate import REDIS_CALL_TIMEOUT, redis_unavailable
from app.admission.slots import Ticket, busy, retry_after, share_exceeded
from app.errors import Busy

logger = logging.getLogger(__name__)

# KEYS: 1 slots, 2 queue, 3 places, 4 the arrival counter, 5 owners, 6 shares. ARGV: 1 channel, 2 limit,
# 3 lease (ms), then the script's. Every script replies {running, waiting, ...} with the fleet's counts after its step.
_PRELUDE = """
local slots, queue, places, seq, owners, shares = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local channel, limit, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local moved = false

-- The one way out of the queue (admitted, given up, lease run out): its key then holds one place fewer.
local function unqueue(id)
  redis.call('ZREM', places, id)
  local removed = redis.call('ZREM', queue, id) == 1
  local owner = redis.call('HGET', owners, id)
  if owner then
    redis.call('HDEL', owners, id)
    if redis.call('HINCRBY', shares, owner, -1) <= 0 then redis.call('HDEL', shares, owner) end
  end
  if removed then moved = true end
  return removed
end

-- Leases nobody renewed belong to a replica that died (or lost Redis for longer than a lease).
local function expire()
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', places, '-inf', now)) do
    unqueue(id)
    moved = true
  end
end

-- Free slots go to the head of the queue, so nobody overtakes it.
local function fill()
  while redis.call('ZCARD', slots) < limit do
    local head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then return end
    unqueue(head)
    redis.call('ZADD', slots, now + lease, head)
  end
end

-- 0: holds a slot; n: n-th in the queue; -1: neither (its lease ran out).
local function position(id)
  if redis.call('ZSCORE', slots, id) then return 0 end
  local rank = redis.call('ZRANK', queue, id)
  if rank then return rank + 1 end
  return -1
end

local function reply(extra)
  if moved then redis.call('PUBLISH', channel, now) end
  local out = {redis.call('ZCARD', slots), redis.call('ZCARD', queue)}
  for _, value in ipairs(extra) do out[#out + 1] = value end
  return out
end

expire()
fill()
"""

# ARGV[4]: the new slot's id. Extra reply: 1 if taken. Taken only when nobody waits.
_ENTER = """
local id = ARGV[4]
if not redis.call('ZSCORE', slots, id) then
  if redis.call('ZCARD', slots) >= limit or redis.call('ZCARD', queue) > 0 then return reply({0}) end
  redis.call('ZADD', slots, now + lease, id)
end
return reply({1})
"""

# ARGV[4]: the ticket's id, ARGV[5]: MINIVAULT_MAX_QUEUE, ARGV[6]: its key ("": no key), ARGV[7]: a key's share
# of the queue (-1: none). Extra reply: its position, or -1: the queue is full, or -2: the key holds its share;
# then the places the key holds. Idempotent (redis-py retries a command after a timeout): a ticket already in
# is not moved back, nor counted twice.
_ENQUEUE = """
local id, owner, share = ARGV[4], ARGV[6], tonumber(ARGV[7])
if position(id) < 0 then
  local waiting = redis.call('ZCARD', queue)
  -- An empty queue holds no places: whatever the hashes still say (keys deleted by hand) is dropped.
  if waiting == 0 then redis.call('DEL', owners, shares) end
  if waiting >= tonumber(ARGV[5]) then return reply({-1, 0}) end
  local mine = tonumber(redis.call('HGET', shares, owner) or '0')
  if share >= 0 and mine >= share then return reply({-2, mine}) end
  redis.call('ZADD', queue, redis.call('INCR', seq), id)
  redis.call('ZADD', places, now + lease, id)
  redis.call('HSET', owners, id, owner)
  redis.call('HINCRBY', shares, owner, 1)
  fill()  -- a slot freed since try_enter found none
end
return reply({position(id), tonumber(redis.call('HGET', shares, owner) or '0')})
"""

# ARGV[4]: how many held slots follow, then their ids, then the ids of this replica's waiting tickets.
# Renews them all; extra reply: how many held slots had already expired, then each ticket's position.
_SYNC = """
local held = tonumber(ARGV[4])
local deadline = now + lease
local lost = 0
for i = 5, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', slots, id) then
    redis.call('ZADD', slots, deadline, id)
  elseif i <= 4 + held then
    lost = lost + 1
  elseif redis.call('ZSCORE', places, id) then
    redis.call('ZADD', places, deadline, id)
  end
end
fill()
local out = {lost}
for i = 5 + held, #ARGV do out[#out + 1] = position(ARGV[i]) end
return reply(out)
"""

# ARGV[4...]: ids to give back, slots or queue places; a slot freed goes to the head of the queue.
_DROP = """
for i = 4, #ARGV do
  if not unqueue(ARGV[i]) then redis.call('ZREM', slots, ARGV[i]) end
end
fill()
return reply({})
"""


class RedisTicket(Ticket):
    """A place in the fleet's queue: its id in Redis, its last known position, and whether its lease ran out."""

    __slots__ = ("id", "place", "lost")

    def __init__(self, member: str, key: str | None = None) -> None:
        super().__init__(key)
        self.id = member
        self.place = 0
        self.lost = False


class RedisAdmission:
    """`limit` slots and a queue of `max_queue` shared by every replica using `client`'s Redis, at most
    `max_per_key` places of it (None: no share) held by one key, fleet-wide.

    Every replica must be given the same limits. `on_change(running, waiting)` is told this
    replica's own slots and waiters (summed over replicas, they are the fleet's). leave() and
    release() give back in the background, so a caller cancelled meanwhile cannot strand a slot.
    """

    def __init__(
        self,
        client: Redis,
        limit: int,
        max_queue: int,
        lease_seconds: float,
        on_change: Callable[[int, int], None] | None = None,
        prefix: str = "minivault:",
        recheck_seconds: float = 2.0,
        max_per_key: int | None = None,
    ) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.max_per_key = max_per_key
        self._client = client
        # One hash tag: on a Redis Cluster all six keys live in one slot, as a script needs.
        tag = f"{prefix}{{admission}}:"
        self._keys = [f"{tag}slots", f"{tag}queue", f"{tag}places", f"{tag}seq", f"{tag}owners", f"{tag}shares"]
        self._channel = f"{tag}changed"
        self._head = (self._channel, limit, max(1, round(lease_seconds * 1000)))
        self._renew_every = lease_seconds / 3
        # The backstop for a lost message: a waiter learns of a free slot this late at worst.
        self._recheck = min(self._renew_every, recheck_seconds)
        self._scripts = {
            name: client.register_script(_PRELUDE + body)
            for name, body in (("enter", _ENTER), ("enqueue", _ENQUEUE), ("sync", _SYNC), ("drop", _DROP))
        }
        self._on_change = on_change
        self._ids = (f"{uuid.uuid4().hex[:12]}:{n}" for n in itertools.count())
        self._held: list[str] = []
        self._waiting: dict[str, RedisTicket] = {}
        self._fleet_waiting = 0
        self._mean_seconds = 1.0
        self._wake = asyncio.Event()
        self._last_sync = 0.0
        self._background: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._failing = False

    async def start(self) -> None:
        """Start listening for queue moves and renewing leases."""
        self._loops = [
            asyncio.create_task(self._listen(), name="minivault-admission-listen"),
            asyncio.create_task(self._keep(), name="minivault-admission-keep"),
        ]

    async def aclose(self) -> None:
        """Stop, and give back whatever this replica still holds, so the fleet need not wait for the leases."""
        for task in self._loops:
            task.cancel()
        if self._loops:
            await asyncio.wait(self._loops, timeout=5)
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        ids = [*self._held, *self._waiting]
        self._held.clear()
        self._waiting.clear()
        if ids:
            await self._drop(ids)

    async def try_enter(self) -> bool:
        """Take a fleet slot at once if one is free and nobody waits anywhere."""
        slot = next(self._ids)
        _, _, taken = await self._claim("enter", slot)
        if taken:
            self._held.append(slot)
            self._changed()
        return bool(taken)

    async def enqueue(self, key: str | None = None) -> Ticket:
        """Join the fleet's queue for `key`, or raise Busy (429) at once when it is full or the key holds its share
        of it on any replica (QueueShareExceeded)."""
        ticket = RedisTicket(next(self._ids), key)
        share = -1 if self.max_per_key is None else self.max_per_key
        running, waiting, place, held = await self._claim("enqueue", ticket.id, self.max_queue, key or "", share)
        if place == -2:
            assert self.max_per_key is not None
            raise share_exceeded(key, held, self.max_per_key, self.retry_after())
        if place < 0:
            raise busy(running, waiting, self.limit, self.max_queue, self.retry_after())
        if place == 0:
            ticket.admitted = True
            self._held.append(ticket.id)
        else:
            ticket.place = place
            self._waiting[ticket.id] = ticket
        self._changed()
        return ticket

    async def position(self, ticket: Ticket) -> int:
        """1 for the head of the fleet's queue; 0 once admitted. Kept current by the listener, so no round trip."""
        assert isinstance(ticket, RedisTicket)
        if ticket.admitted:
            return 0
        if ticket.lost:
            raise Busy(
                "this prompt lost its place in the queue: MiniVault could not reach Redis for longer than "
                f"MINIVAULT_SLOT_LEASE_SECONDS; retry after {self.retry_after()} s",
                self.retry_after(),
            )
        return ticket.place

    async def leave(self, ticket: Ticket) -> None:
        """Give up a place; a slot handed over meanwhile (even one this replica has not heard of) is passed on."""
        assert isinstance(ticket, RedisTicket)
        if ticket.admitted:
            await self.release()
            return
        self._waiting.pop(ticket.id, None)
        self._changed()
        self._spawn(self._drop([ticket.id]))

    async def release(self, seconds: float | None = None) -> None:
        """Free one of this replica's slots: the head of the fleet's queue gets it."""
        if seconds is not None:
            self._mean_seconds += (seconds - self._mean_seconds) * 0.1
        if self._held:
            slot = self._held.pop()
            self._changed()
            self._spawn(self._drop([slot]))

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the fleet's queue as last seen, at this replica's recent pace."""
        return retry_after(self._fleet_waiting, self.limit, self._mean_seconds)

    async def _run(self, name: str, *args: str | int) -> list[int]:
        script: AsyncScript = self._scripts[name]
        try:
            async with asyncio.timeout(REDIS_CALL_TIMEOUT):
                reply: list[int] = await script(keys=self._keys, args=[*self._head, *args])
        except (RedisError, TimeoutError) as exc:
            raise redis_unavailable(exc) from exc
        self._fleet_waiting = reply[1]
        return reply

    async def _claim(self, name: str, member: str, *args: str | int) -> list[int]:
        # Shielded: when the caller is cancelled mid-call, the script may still take a slot or place
        # for `member`; it is given back once the call ends, rather than left to its lease.
        call = asyncio.ensure_future(self._run(name, member, *args))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._undo(done, member))
            raise

    def _undo(self, call: "asyncio.Future[list[int]]", member: str) -> None:
        if not call.cancelled() and call.exception() is None:
            self._spawn(self._drop([member]))

    async def _drop(self, ids: Sequence[str]) -> None:
        try:
            await self._run("drop", *ids)
        except Exception:
            logger.warning("could not give back %d slots or queue places in Redis; their leases will expire", len(ids))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sync(self) -> None:
        """Renew every lease this replica holds and learn where its waiters stand."""
        held = list(self._held)
        waiting = list(self._waiting.values())
        reply = await self._run("sync", len(held), *held, *(ticket.id for ticket in waiting))
        if reply[2]:
            logger.warning("%d slots expired in Redis while still in use (MINIVAULT_SLOT_LEASE_SECONDS)", reply[2])
        counts_changed = False
        for ticket, place in zip(waiting, reply[3:], strict=True):
            if self._waiting.get(ticket.id) is not ticket:
                continue  # it left while we asked
            if place == 0:
                del self._waiting[ticket.id]
                self._held.append(ticket.id)
                ticket.admitted = True
            elif place < 0:
                del self._waiting[ticket.id]
                ticket.lost = True
            elif place != ticket.place:
                ticket.place = place
            else:
                continue
            counts_changed = counts_changed or place <= 0
            ticket.changed.set()
        if counts_changed:
            self._changed()

    async def _keep(self) -> None:
        """Sync when the queue moved and this replica has waiters, and every few seconds anyway."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                # Not asyncio.wait_for: on 3.11 it can swallow a cancellation that comes as the event is set.
                async with asyncio.timeout(self._recheck):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            renew_due = bool(self._held) and loop.time() - self._last_sync >= self._renew_every
            if not self._waiting and not renew_due:
                continue
            try:
                await self._sync()
            except Exception as exc:
                if not self._failing:
                    logger.warning("cannot renew this replica's slots in Redis: %s", exc)
                self._failing = True
                continue
            if self._failing:
                logger.warning("Redis answers again; this replica's slots are renewed")
            self._failing = False
            self._last_sync = loop.time()

    async def _listen(self) -> None:
        """Wake the syncer on every queue move published by any replica; resubscribe after a lost connection."""
        failures = 0
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                failures = 0
                self._wake.set()  # whatever was published while unsubscribed
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        self._wake.set()
            except RedisError as exc:
                failures += 1
                if failures == 1:
                    logger.warning("lost the subscription to the queue's moves in Redis (%s); retrying", exc)
            finally:
                try:
                    await pubsub.aclose()
                except RedisError:
                    pass  # the connection is gone already
            # Back off while Redis is away; waiters still learn of moves through the periodic sync.
            await asyncio.sleep(min(5.0, 0.05 * 2**failures))

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(len(self._held), len(self._waiting))
