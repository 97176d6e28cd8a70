"""A cached probe of the upstream, so /health stays cheap under polling."""

import asyncio
import time

from app.backends import Backend, BackendStatus


class BackendProbe:
    """Runs `backend.probe` at most once per `ttl` seconds; concurrent callers share one probe."""

    def __init__(self, backend: Backend, timeout: float, ttl: float) -> None:
        self._backend = backend
        self._timeout = timeout
        self._ttl = ttl
        self._lock = asyncio.Lock()
        self._status: BackendStatus | None = None
        self._checked_at = 0.0

    async def status(self) -> BackendStatus:
        if self._fresh():
            assert self._status is not None
            return self._status
        async with self._lock:
            if not self._fresh():
                self._status = await self._backend.probe(self._timeout)
                self._checked_at = time.monotonic()
        assert self._status is not None
        return self._status

    def forget(self) -> None:
        """Drop the cached result (the upstream just changed, e.g. a model was pulled): the next call probes."""
        self._status = None

    def _fresh(self) -> bool:
        return self._status is not None and time.monotonic() - self._checked_at < self._ttl
