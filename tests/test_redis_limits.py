"""Limits shared through a real Redis: two RedisAdmission "replicas" (two clients) on one server, a replica
killed with SIGKILL, the per-key rate limit across both, and open_limits."""

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from app.admission.opening import open_limits, redis_client
from app.admission.rate import LocalRateLimit, RedisRateLimit
from app.admission.redis_slots import RedisAdmission
from app.admission.slots import Admission, Ticket
from app.errors import Busy, RateLimited
from tests.conftest import make_settings
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.anyio

STEP = 10.0  # generous bound on any single step that should take milliseconds
SLOTS, QUEUE = "minivault:{admission}:slots", "minivault:{admission}:queue"


@asynccontextmanager
async def replica(
    url: str, limit: int, max_queue: int = 10, lease: float = 30.0, recheck: float = 2.0,
    views: list[tuple[int, int]] | None = None,
) -> AsyncIterator[RedisAdmission]:  # fmt: skip
    """One replica's admission, with a Redis client of its own."""
    client = redis_client(url)
    admission = RedisAdmission(client, limit, max_queue, lease, recorder(views), recheck_seconds=recheck)
    await admission.start()
    try:
        yield admission
    finally:
        await admission.aclose()
        await client.aclose()


def recorder(views: list[tuple[int, int]] | None) -> Callable[[int, int], None] | None:
    """An on_change hook that keeps every (running, waiting) it is told."""
    return None if views is None else lambda running, waiting: views.append((running, waiting))


def fleet(server: RedisServer) -> tuple[int, int]:
    """Slots taken and places queued, as Redis holds them."""
    with server.client() as client:
        return client.zcard(SLOTS), client.zcard(QUEUE)


async def until(condition: Callable[[], bool], what: str, within: float = STEP) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


async def admitted(ticket: Ticket, within: float = STEP) -> None:
    async def wait() -> None:
        while not ticket.admitted:
            await ticket.changed.wait()
            ticket.changed.clear()

    await asyncio.wait_for(wait(), within)


# --- admission across replicas -----------------------------------------------------------------------------


async def test_limit_holds_across_two_replicas_with_exact_counts_and_fifo_admission(
    redis_url: str, redis_server: RedisServer
) -> None:
    views_a: list[tuple[int, int]] = []
    views_b: list[tuple[int, int]] = []
    async with replica(redis_url, 3, views=views_a) as a, replica(redis_url, 3, views=views_b) as b:
        contenders = [a, b, a, b, a]
        entered = await asyncio.gather(*(r.try_enter() for r in contenders))
        assert sorted(entered) == [False, False, True, True, True]
        holders = [r for r, ok in zip(contenders, entered, strict=True) if ok]
        losers = [r for r, ok in zip(contenders, entered, strict=True) if not ok]
        # The two without a slot queue up, then one more from each replica.
        waiters = [(owner, await owner.enqueue()) for owner in [*losers, a, b]]
        assert [await owner.position(ticket) for owner, ticket in waiters] == [1, 2, 3, 4]
        assert fleet(redis_server) == (3, 4)

        for turn, (owner, ticket) in enumerate(waiters):
            await holders.pop(0).release(0.5)
            await admitted(ticket)
            holders.append(owner)
            # One slot freed, one admitted: the head of the fleet's queue, whichever replica it waits on.
            assert [t.admitted for _, t in waiters] == [True] * (turn + 1) + [False] * (3 - turn)
            behind = waiters[turn + 1 :]
            await until(lambda b=behind: [t.place for _, t in b] == list(range(1, len(b) + 1)), "the queue moved up")
            assert [await o.position(t) for o, t in behind] == list(range(1, len(behind) + 1))
            assert fleet(redis_server) == (3, 3 - turn)
        # Each replica's gauges count its own slots; together they are the fleet's.
        assert (views_a[-1], views_b[-1]) == ((holders.count(a), 0), (holders.count(b), 0))
        assert holders.count(a) + holders.count(b) == 3

    assert fleet(redis_server) == (0, 0)  # both replicas closed: everything given back, no lease waited out


async def test_each_replica_reports_its_own_running_and_waiting(redis_url: str, redis_server: RedisServer) -> None:
    views_a: list[tuple[int, int]] = []
    views_b: list[tuple[int, int]] = []
    async with replica(redis_url, 2, views=views_a) as a, replica(redis_url, 2, views=views_b) as b:
        assert await a.try_enter() and await a.try_enter()
        first, second = await b.enqueue(), await a.enqueue()
        assert (views_a[-1], views_b[-1]) == ((2, 1), (0, 1))
        await a.release(1.0)
        await admitted(first)
        assert (views_a[-1], views_b[-1]) == ((1, 1), (1, 0))
        await a.leave(second)
        assert (views_a[-1], views_b[-1]) == ((1, 0), (1, 0))
        await until(lambda: fleet(redis_server) == (2, 0), "the place left was given back in Redis")


async def test_full_fleet_queue_refuses_at_once_and_a_place_left_is_free_again(
    redis_url: str, redis_server: RedisServer
) -> None:
    async with replica(redis_url, 1, max_queue=2) as a, replica(redis_url, 1, max_queue=2) as b:
        assert await a.try_enter()
        first, second = await b.enqueue(), await a.enqueue()
        assert not await b.try_enter()
        with pytest.raises(Busy) as refused:
            await b.enqueue()
        assert (refused.value.status, refused.value.code, refused.value.retry_after) == (429, "busy", 3)
        assert refused.value.headers == {"Retry-After": "3"}
        assert refused.value.message == (
            "MiniVault is busy: 1 generations are running and 2 are queued "
            "(MINIVAULT_MAX_CONCURRENCY=1, MINIVAULT_MAX_QUEUE=2); retry after 3 s"
        )
        assert fleet(redis_server) == (1, 2)

        await b.leave(first)
        await until(lambda: second.place == 1, "the other replica's waiter moved up")
        third = await b.enqueue()
        assert (await a.position(second), await b.position(third)) == (1, 2)
        assert fleet(redis_server) == (1, 2)


async def test_released_slot_reaches_the_other_replicas_waiter_by_notification(
    redis_url: str, redis_server: RedisServer
) -> None:
    # Periodic checks 40 s apart: an admission within STEP can only come from the published move.
    async with (
        replica(redis_url, 1, lease=120.0, recheck=60.0) as a,
        replica(redis_url, 1, lease=120.0, recheck=60.0) as b,
    ):
        assert await a.try_enter()
        ticket = await b.enqueue()
        assert await b.position(ticket) == 1
        assert not await a.try_enter()  # nobody overtakes the queue
        await a.release(2.0)
        await admitted(ticket)
        assert await b.position(ticket) == 0
        assert fleet(redis_server) == (1, 0)


DYING_REPLICA = """
import asyncio, sys
from app.admission.redis_slots import RedisAdmission
from app.admission.opening import redis_client

async def main():
    admission = RedisAdmission(redis_client(sys.argv[1]), 2, 10, float(sys.argv[2]))
    await admission.start()
    entered = [await admission.try_enter(), await admission.try_enter()]
    ticket = await admission.enqueue()
    print(entered, await admission.position(ticket), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_replicas_slots_and_queue_places_come_back_after_the_lease(
    redis_url: str, redis_server: RedisServer
) -> None:
    lease = 1.0  # short, yet three renewals long for a loaded machine
    views: list[tuple[int, int]] = []
    async with replica(redis_url, 2, lease=lease, views=views) as live:
        dying = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DYING_REPLICA, redis_url, str(lease),
            cwd=Path(__file__).parent.parent, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert await asyncio.wait_for(dying.stdout.readline(), STEP) == b"[True, True] 1\n"  # type: ignore[union-attr]
            assert not await live.try_enter()
            ticket = await live.enqueue()
            assert await live.position(ticket) == 2
            assert fleet(redis_server) == (2, 2)
        finally:
            dying.kill()
            await dying.wait()

        await admitted(ticket)
        # Both dead slots and the dead queue place expired: only the live replica's slot is left.
        await until(lambda: fleet(redis_server) == (1, 0), "the dead replica's leases expired")
        assert views[-1] == (1, 0)
        # The live slot outlives several leases: the replica renews it.
        with redis_server.client() as client:
            [(slot, first_expiry)] = client.zrange(SLOTS, 0, -1, withscores=True)
            renewed = first_expiry + 2 * lease * 1000
            await until(lambda: (client.zscore(SLOTS, slot) or 0) > renewed, "the live slot was renewed")
        assert fleet(redis_server) == (1, 0)
        await live.release()
        await until(lambda: fleet(redis_server) == (0, 0), "the slot was released")


# --- the rate limit ----------------------------------------------------------------------------------------


async def test_rate_limit_holds_across_two_replicas_per_key(redis_url: str, redis_server: RedisServer) -> None:
    async with redis_client(redis_url) as first_client, redis_client(redis_url) as second_client:
        one, two = RedisRateLimit(first_client, 3), RedisRateLimit(second_client, 3)
        for limiter in (one, two, one):
            await limiter.check("k1")
        with pytest.raises(RateLimited) as refused:
            await two.check("k1")
        error = refused.value
        assert (error.status, error.code) == (429, "rate_limited")
        # One prompt every 20 s once the burst of 3 is spent (19 only on a machine stalled for a second).
        assert error.retry_after in (19, 20)
        assert error.headers == {"Retry-After": str(error.retry_after)}
        assert error.message == (
            "rate limit: at most 3 prompts per minute per API key (MINIVAULT_RATE_LIMIT=3); "
            f"retry after {error.retry_after} s"
        )
        with pytest.raises(RateLimited):
            await one.check("k1")  # a refused prompt costs nothing, but does not pass either
        await one.check("k2")  # another key is unaffected
        for limiter in (two, one, two):
            await limiter.check(None)  # no key: the shared "anonymous" bucket
        with pytest.raises(RateLimited):
            await one.check(None)

    with redis_server.client() as client:
        keys = sorted(client.keys("minivault:rate:*"))
        assert keys == [b"minivault:rate:anonymous", b"minivault:rate:k1", b"minivault:rate:k2"]
        assert all(0 < client.pttl(key) <= 60_000 for key in keys)


async def test_in_process_rate_limit_counts_per_key() -> None:
    limiter = LocalRateLimit(2)
    await limiter.check("k1")
    await limiter.check("k1")
    with pytest.raises(RateLimited) as refused:
        await limiter.check("k1")
    assert refused.value.retry_after in (29, 30)
    await limiter.check(None)
    await limiter.check("k2")


# --- open_limits -------------------------------------------------------------------------------------------


async def test_open_limits_without_redis_keeps_them_in_process(log_path: Path) -> None:
    async with AsyncExitStack() as stack:
        admission, limiter = await open_limits(make_settings(log_path=log_path), stack)
        assert (type(admission), limiter) == (Admission, None)
        _, limiter = await open_limits(make_settings(log_path=log_path, rate_limit=5), stack)
        assert type(limiter) is LocalRateLimit


async def test_open_limits_with_redis_shares_them_and_gives_back_on_close(
    redis_url: str, redis_server: RedisServer, log_path: Path
) -> None:
    settings = make_settings(log_path=log_path, redis_url=redis_url, max_concurrency=2, rate_limit=5)
    views: list[tuple[int, int]] = []
    async with AsyncExitStack() as stack:
        admission, limiter = await open_limits(settings, stack, recorder(views))
        assert (type(admission), type(limiter)) == (RedisAdmission, RedisRateLimit)
        assert await admission.try_enter()
        await admission.enqueue()  # a slot is still free: admitted at once
        assert views[-1] == (2, 0)
        assert fleet(redis_server) == (2, 0)
    assert fleet(redis_server) == (0, 0)  # given back on close, not left to the lease
