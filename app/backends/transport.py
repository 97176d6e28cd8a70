"""The one pooled HTTP client per upstream: httpx's API, over aiohttp's faster transport by default.

httpx's own transport costs about twice the CPU per streamed request (see bench/); the
httpx-aiohttp transport keeps the same client API. Its exception mapping is coarse (a refused
connection arrives as ConnectTimeout), so `failure_kind` reads the aiohttp cause to tell
refused, timed out and broken apart again.
"""

import asyncio
import logging
import random

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from app.config import Settings

logger = logging.getLogger(__name__)


def pooled_client(settings: Settings, base_url: str, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """The client MiniVault keeps to one upstream for its whole lifetime."""
    limits = httpx.Limits(
        max_connections=settings.upstream_max_connections,
        max_keepalive_connections=settings.upstream_max_connections,
    )
    # Generations are bounded by the service's first-token and idle timeouts, which name themselves;
    # this read bound is a backstop for them and bounds the other calls (models, pull progress).
    backstop = max(settings.first_token_timeout, settings.idle_timeout) + 1
    timeout = httpx.Timeout(connect=settings.connect_timeout, read=backstop, write=backstop, pool=backstop)
    inner: httpx.AsyncBaseTransport
    if settings.upstream_transport == "aiohttp":
        inner = AiohttpTransport(limits=limits, client=lambda: _aiohttp_session(limits))
    else:
        inner = httpx.AsyncHTTPTransport(limits=limits)
    transport = RetryConnect(inner, settings.upstream_retries) if settings.upstream_retries else inner
    # Streams are parsed as they arrive from the raw bytes, so ask upstreams not to compress them.
    headers = {"Accept-Encoding": "identity", **(headers or {})}
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits, transport=transport)


class RetryConnect(httpx.AsyncBaseTransport):
    """Retries a request whose connection failed before anything was sent, with short jittered backoff.

    Only connection failures are retried: once bytes went upstream, a retry could run a prompt twice.
    This is what lets the next request succeed right after the upstream restarts.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, retries: int, backoff: float = 0.1) -> None:
        self._inner = inner
        self._retries = retries
        self._backoff = backoff

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return await self._inner.handle_async_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt >= self._retries or not issubclass(failure_kind(exc), httpx.ConnectError):
                    raise
                delay = self._backoff * 2**attempt * (0.5 + random.random())
                attempt += 1
                logger.info("upstream connection failed (%s); retry %d in %.2f s", exc, attempt, delay)
                await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _aiohttp_session(limits: httpx.Limits) -> aiohttp.ClientSession:
    # Upstream LLM servers set no cookies worth keeping; a dummy jar skips parsing them per response.
    connector = aiohttp.TCPConnector(limit=limits.max_connections or 0, keepalive_timeout=limits.keepalive_expiry)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


def failure_kind(exc: httpx.HTTPError) -> type[httpx.HTTPError]:
    """The httpx exception class that truly describes `exc`, whichever transport raised it."""
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout
    if isinstance(cause, aiohttp.SocketTimeoutError):
        return httpx.ReadTimeout
    if isinstance(cause, asyncio.TimeoutError):
        return httpx.TimeoutException
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError
    if isinstance(cause, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError
    return type(exc)
