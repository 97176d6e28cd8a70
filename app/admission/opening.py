"""Opening the limits: admission and the rate limit, in process, or in Redis when MINIVAULT_REDIS_URL is set."""

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.admission.rate import LocalRateLimit, RateLimiter, RedisRateLimit
from app.admission.redis_slots import RedisAdmission
from app.admission.slots import Admission, AdmissionControl
from app.config import Settings

logger = logging.getLogger(__name__)

# Seconds to connect to Redis. No socket_timeout (redis-py 8 defaults to 5 s): with one, redis-py writes
# through asyncio.wait_for, which on Python 3.11 can swallow a cancellation (a client that left, a shutdown;
# seen here about once in 50 cancels). The limiters bound each call with asyncio.timeout instead.
_CONNECT_TIMEOUT = 5.0


def queue_share(settings: Settings) -> int | None:
    """Places one key may hold in the queue: MINIVAULT_MAX_QUEUE_PER_KEY, else half the queue (rounded up) when
    several keys are configured; None (the whole queue) with one key or none."""
    if settings.max_queue_per_key is not None:
        return settings.max_queue_per_key
    if len(settings.key_digests()) > 1:
        return (settings.max_queue + 1) // 2
    return None


def redis_client(url: str) -> Redis:
    """An asyncio client for the limits' Redis (a pool of connections, opened as needed)."""
    return Redis.from_url(url, socket_connect_timeout=_CONNECT_TIMEOUT, socket_timeout=None)


async def open_limits(
    settings: Settings, stack: AsyncExitStack, on_change: Callable[[int, int], None] | None = None
) -> tuple[AdmissionControl, RateLimiter | None]:
    """The admission limiter (with each key's share of the queue) and the rate limiter (None:
    MINIVAULT_RATE_LIMIT unset); `stack` closes them.

    With MINIVAULT_REDIS_URL both are shared by every replica using that Redis. A Redis that does not
    answer at start-up is not fatal: prompts get 503 until it does.
    """
    share = queue_share(settings)
    if settings.redis_url is None:
        admission = Admission(settings.max_concurrency, settings.max_queue, on_change, max_per_key=share)
        return admission, LocalRateLimit(settings.rate_limit) if settings.rate_limit else None
    client = redis_client(settings.redis_url.get_secret_value())
    stack.push_async_callback(client.aclose)
    try:
        await client.ping()
    except RedisError as exc:
        logger.warning("Redis (MINIVAULT_REDIS_URL) does not answer yet (%s); prompts get 503 until it does", exc)
    redis_admission = RedisAdmission(
        client, settings.max_concurrency, settings.max_queue, settings.slot_lease_seconds, on_change,
        max_per_key=share,
    )  # fmt: skip
    await redis_admission.start()
    stack.push_async_callback(redis_admission.aclose)
    return redis_admission, RedisRateLimit(client, settings.rate_limit) if settings.rate_limit else None
