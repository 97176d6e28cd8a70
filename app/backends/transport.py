"""The one pooled HTTP client per upstream: httpx's API, over aiohttp's faster transport by default.

httpx's own transport costs about twice the CPU per streamed request (see bench/); the
httpx-aiohttp transport keeps the same client API. Its exception mapping is coarse (a refused
connection arrives as ConnectTimeout), so `failure_kind` reads the aiohttp cause to tell
refused, timed out and broken apart again.
"""

import asyncio

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from app.config import Settings


def pooled_client(settings: Settings, base_url: str, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """The client MiniVault keeps to one upstream for its whole lifetime."""
    limits = httpx.Limits(
        max_connections=settings.upstream_max_connections,
        max_keepalive_connections=settings.upstream_max_connections,
    )
    timeout = httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.read_timeout,
        write=settings.read_timeout,
        pool=settings.read_timeout,
    )
    transport = None
    if settings.upstream_transport == "aiohttp":
        transport = AiohttpTransport(limits=limits, client=lambda: _aiohttp_session(limits))
    # Streams are parsed as they arrive from the raw bytes, so ask upstreams not to compress them.
    headers = {"Accept-Encoding": "identity", **(headers or {})}
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits, transport=transport)


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
