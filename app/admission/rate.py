"""The per-key rate limit: MINIVAULT_RATE_LIMIT prompts per minute per API key, in process or in Redis.

Both keep GCRA (the generic cell rate algorithm): each key has a "theoretical arrival time" that
every accepted prompt pushes 60/limit seconds further; a prompt is refused while that time is
more than a minute ahead. So a key may send `limit` prompts at once, then one every 60/limit s,
and a prompt refused for the rate costs nothing. Requests refused as invalid or too large count
like prompts (GenerationService.refuse), so a flood of bad requests soon gets the cheap 429.
Requests without an API key share the bucket "anonymous".
"""

import asyncio
import math
import time
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.errors import BackendUnavailable, RateLimited

ANONYMOUS = "anonymous"
_PERIOD = 60.0
# Seconds one Redis call of the limits may take: Redis answers in microseconds, so this only bounds an outage.
REDIS_CALL_TIMEOUT = 5.0


class RateLimiter(Protocol):
    """Counts one prompt against its key, or raises RateLimited (429 with Retry-After)."""

    async def check(self, key_id: str | None) -> None:
        """Count the prompt; raise RateLimited when the key is over its rate."""
        ...


def rate_limited(limit: int, wait: float) -> RateLimited:
    """The 429 a prompt over the rate gets; `wait` is the seconds until the key may send again."""
    retry_after = max(1, math.ceil(wait))
    return RateLimited(
        f"rate limit: at most {limit} prompts per minute per API key (MINIVAULT_RATE_LIMIT={limit}); "
        f"retry after {retry_after} s",
        retry_after,
    )


class LocalRateLimit:
    """The rate limit of this process alone (no MINIVAULT_REDIS_URL)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._interval = _PERIOD / limit
        # key -> theoretical arrival time (time.monotonic()); a key whose time has passed is as good as absent.
        self._tat: dict[str, float] = {}

    async def check(self, key_id: str | None) -> None:
        """Count the prompt against `key_id` (None: the shared anonymous bucket)."""
        key = key_id or ANONYMOUS
        now = time.monotonic()
        tat = max(self._tat.get(key, now), now) + self._interval
        if tat - now > _PERIOD:
            raise rate_limited(self.limit, tat - now - _PERIOD)
        if len(self._tat) >= 10_000:  # keys are few (the configured ones); still, never grow without bound
            self._tat = {k: t for k, t in self._tat.items() if t > now}
        self._tat[key] = tat


# KEYS[1]: the key's theoretical arrival time, in Redis server milliseconds (so replicas' clocks never matter).
# ARGV: 1 the period in ms, 2 the limit. Returns 0 (counted) or the ms to wait (refused, nothing counted).
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local period = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
tat = tat + period / tonumber(ARGV[2])
if tat - now > period then
  return math.ceil(tat - now - period)
end
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now))
return 0
"""


class RedisRateLimit:
    """The rate limit shared by every replica using the same Redis: one Lua GCRA step per prompt."""

    def __init__(self, client: Redis, limit: int, prefix: str = "minivault:") -> None:
        self.limit = limit
        self._prefix = f"{prefix}rate:"
        self._script = client.register_script(_GCRA)
        self._args = (round(_PERIOD * 1000), limit)

    async def check(self, key_id: str | None) -> None:
        """Count the prompt against `key_id` (None: the shared anonymous bucket) in Redis."""
        try:
            async with asyncio.timeout(REDIS_CALL_TIMEOUT):
                wait_ms = await self._script(keys=[self._prefix + (key_id or ANONYMOUS)], args=self._args)
        except (RedisError, TimeoutError) as exc:
            raise redis_unavailable(exc) from exc
        if wait_ms:
            raise rate_limited(self.limit, wait_ms / 1000)


def redis_unavailable(exc: BaseException) -> BackendUnavailable:
    """The 503 a prompt gets while the Redis that holds the fleet's limits does not answer."""
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else f"no answer within {REDIS_CALL_TIMEOUT:g} s"
    return BackendUnavailable(
        f"the Redis holding the shared limits (MINIVAULT_REDIS_URL) did not answer ({reason}); retry shortly"
    )
