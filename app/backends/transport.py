"""The one pooled HTTP client per upstream: httpx's API, over aiohttp's faster transport by default.

httpx's own transport costs about twice the CPU per streamed request (see bench/); the
httpx-aiohttp transport keeps the same client API. Its exception mapping is coarse (a refused
connection arrives as ConnectTimeout), so `failure_kind` reads the aiohttp cause to tell
refused, timed out and broken apart again.

Idle connections are kept for less time than the upstream keeps them (`IDLE_EXPIRY`, lowered to
below what a response announces in `Keep-Alive: timeout=N`), and a request whose reused
connection turns out to be closed anyway (the upstream closed it as the request went out) is sent
again once on a new connection: llama.cpp's server closes idle connections after 5 s, and reusing
one it has just closed was an intermittent 502.
"""

import asyncio
import contextvars
import logging
import random
import re
import weakref
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpcore
import httpx
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from httpx_aiohttp import AiohttpTransport

from app.config import Settings

logger = logging.getLogger(__name__)

# Seconds an idle upstream connection is kept: below the 5 s after which llama.cpp's server, uvicorn (vLLM,
# LocalAI's and most Python servers) and Node close theirs; httpx's default is those same 5 s, which raced them.
IDLE_EXPIRY = 4.0
# `Keep-Alive: timeout=5, max=100` (RFC 2068 §19.7.1.1): the seconds the upstream keeps an idle connection.
_KEEP_ALIVE_TIMEOUT = re.compile(r"(?:^|[,;\s])timeout\s*=\s*\"?(\d+(?:\.\d+)?)", re.IGNORECASE)
# httpcore's words for a connection that closed before a single byte of the response.
_NO_RESPONSE = "Server disconnected without sending a response."


def pooled_client(settings: Settings, base_url: str, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """The client MiniVault keeps to one upstream for its whole lifetime."""
    # Generations are bounded by the service's first-token and idle timeouts, which name themselves;
    # this read bound is a backstop for them and bounds the other calls (models, pull progress).
    backstop = max(settings.first_token_timeout, settings.idle_timeout) + 1
    timeout = httpx.Timeout(connect=settings.connect_timeout, read=backstop, write=backstop, pool=backstop)
    # Streams are parsed as they arrive from the raw bytes, so ask upstreams not to compress them.
    headers = {"Accept-Encoding": "identity", **(headers or {})}
    transport = upstream_transport(settings)
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, transport=transport)


def upstream_transport(
    settings: Settings, *, idle_expiry: float = IDLE_EXPIRY, stale_retry: bool = True
) -> "RetryConnect":
    """The pooled transport under `pooled_client`, with its retries; the keywords exist for the tests' baseline."""
    size = settings.upstream_max_connections
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=idle_expiry)
    inner: httpx.AsyncBaseTransport
    fresh: httpx.AsyncBaseTransport
    if settings.upstream_transport == "aiohttp":
        inner = AiohttpTransport(limits=limits, client=lambda: _aiohttp_session(limits, keep_alive=True))
        fresh = AiohttpTransport(limits=limits, client=lambda: _aiohttp_session(limits, keep_alive=False))
    else:
        inner = httpx.AsyncHTTPTransport(limits=limits)
        fresh = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=size, max_keepalive_connections=0))
    return RetryConnect(inner, settings.upstream_retries, fresh=fresh if stale_retry else None, idle_expiry=idle_expiry)


@dataclass(slots=True)
class _Attempt:
    """What the pool did for one attempt of a request, as `_Connector` and `_httpcore_trace` report it."""

    opened: bool = False  # a new connection was opened for it
    reused: bool = False  # it went out on a connection an earlier request had used


# The attempt in progress in this task: the pools report into it from inside `handle_async_request`, in its context.
_attempt: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar("upstream_attempt", default=None)


class RetryConnect(httpx.AsyncBaseTransport):
    """Retries what never reached the upstream, and keeps idle connections less long than the upstream does.

    A refused connection is retried `retries` times with short jittered backoff (what lets the next request
    succeed right after the upstream restarts). A request whose *reused* connection failed before any byte of
    the answer arrived is sent once more, at once, on the `fresh` transport (a new connection): the upstream
    closed that idle connection as the request went out, before reading it. Nothing else is retried, not even
    such a failure on a new connection (the upstream read that request): a retry could run a prompt twice.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        retries: int,
        backoff: float = 0.1,
        *,
        fresh: httpx.AsyncBaseTransport | None = None,
        idle_expiry: float | None = None,
    ) -> None:
        self._inner = inner
        self._retries = retries
        self._backoff = backoff
        self._fresh = fresh
        self._idle_expiry = idle_expiry
        self._keep_alive_seen: str | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if isinstance(self._inner, httpx.AsyncHTTPTransport):
            request.extensions.setdefault("trace", _httpcore_trace)
        transport, attempt, fresh_tried = self._inner, 0, False
        while True:
            probe = _Attempt()
            token = _attempt.set(probe)
            try:
                response = await transport.handle_async_request(request)
            except httpx.TransportError as exc:
                if self._fresh is not None and not fresh_tried and probe.reused and _unanswered(exc, request):
                    fresh_tried, transport = True, self._fresh
                    logger.info("upstream closed a reused connection before answering (%r); retrying on a new one", exc)
                    continue
                if not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout) or attempt >= self._retries:
                    raise
                if not issubclass(failure_kind(exc), httpx.ConnectError):
                    raise
                delay = self._backoff * 2**attempt * (0.5 + random.random())
                attempt += 1
                logger.info("upstream connection failed (%s); retry %d in %.2f s", exc, attempt, delay)
                await asyncio.sleep(delay)
                continue
            finally:
                _attempt.reset(token)
            if transport is self._inner:
                self._follow_keep_alive(request, response)
            return response

    def _follow_keep_alive(self, request: httpx.Request, response: httpx.Response) -> None:
        """Shorten the pool's idle expiry to below the `Keep-Alive: timeout=N` the upstream announces."""
        header = response.headers.get("keep-alive")
        # An upstream repeats the same header on every response: parse each value once.
        if header is None or header == self._keep_alive_seen:
            return
        self._keep_alive_seen = header
        if (found := _KEEP_ALIVE_TIMEOUT.search(header)) is None:
            return
        announced = float(found.group(1))
        expiry = idle_expiry_for(announced)
        if self._idle_expiry is not None and expiry >= self._idle_expiry:
            return
        if _set_idle_expiry(self._inner, expiry, self._idle_expiry):
            self._idle_expiry = expiry
            logger.info(
                "%s closes idle connections after %g s; keeping them %.2f s",
                request.url.netloc.decode("ascii", "replace"), announced, expiry,
            )  # fmt: skip

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if self._fresh is not None:
                await self._fresh.aclose()


def idle_expiry_for(announced: float) -> float:
    """How long to keep an idle connection to an upstream that closes it after `announced` seconds.

    A fifth less, and at least half a second less: its clock starts as it sends the last byte, ours later.
    """
    return max(0.0, min(announced * 0.8, announced - 0.5))


def _unanswered(exc: httpx.TransportError, request: httpx.Request) -> bool:
    """Whether `exc` says the connection closed with nothing of the response read, for a body that can be resent."""
    try:
        request.content  # noqa: B018 - a streamed body was consumed by the first attempt and cannot be resent
    except httpx.RequestNotRead:
        return False
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        # Its message is the default unless the parser held part of a response when the connection closed.
        return cause.message == "Server disconnected"
    if isinstance(cause, aiohttp.ClientOSError) and not isinstance(cause, aiohttp.ClientConnectorError):
        return True  # the reset or broken pipe of writing to ("Can not write request body") or reading from it
    if isinstance(cause, aiohttp.ClientError):
        return False
    # httpx's own transport: a write or read error, or the end of the connection before any byte.
    return isinstance(exc, httpx.WriteError | httpx.ReadError) or (
        isinstance(exc, httpx.RemoteProtocolError) and str(exc) == _NO_RESPONSE
    )


async def _httpcore_trace(event: str, info: dict[str, Any]) -> None:
    """httpcore's `trace` extension: it opens a connection (connect_*) before sending, unless it reuses one."""
    probe = _attempt.get()
    if probe is None:
        return
    if event.startswith("connection.connect_"):
        probe.opened = True
    elif event == "http11.send_request_headers.started":
        probe.reused = not probe.opened


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, telling the attempt in progress whether its connection served a request before.

    A trace config would say as much, but costs a signal per response chunk; this costs a set lookup per request.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._served: weakref.WeakSet[Any] = weakref.WeakSet()

    # aiohttp's own signature, which the session calls by keyword.
    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        if protocol is not None:
            if (probe := _attempt.get()) is not None:
                probe.reused = protocol in self._served
            self._served.add(protocol)
        return connection


def _aiohttp_session(limits: httpx.Limits, *, keep_alive: bool) -> aiohttp.ClientSession:
    # Upstream LLM servers set no cookies worth keeping; a dummy jar skips parsing them per response.
    limit = limits.max_connections or 0
    connector = (
        _Connector(limit=limit, keepalive_timeout=limits.keepalive_expiry)
        if keep_alive
        else aiohttp.TCPConnector(limit=limit, force_close=True)
    )
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())


def _set_idle_expiry(transport: httpx.AsyncBaseTransport, seconds: float, previous: float | None) -> bool:
    """Make `transport`'s pool drop connections idle `seconds`, the open ones included; False when it cannot.

    Neither library can change this once its pool exists, so this sets what their pools read at each reuse
    (aiohttp's TCPConnector, httpcore's pool and connections), at the versions pinned in requirements.txt and
    exercised by tests/test_stale_connections.py. Should that fail, the fixed IDLE_EXPIRY and the retry remain.
    """
    if isinstance(transport, AiohttpTransport):
        session = transport.client
        connector = session.connector if isinstance(session, aiohttp.ClientSession) else None
        if connector is None or not hasattr(connector, "_keepalive_timeout"):
            return False
        connector._keepalive_timeout = seconds  # private: compared with each idle connection's age on reuse
        return True
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.AsyncConnectionPool) or not hasattr(pool, "_keepalive_expiry"):
        return False
    pool._keepalive_expiry = seconds  # private: given to each connection it opens from now on
    sooner = 0.0 if previous is None else max(0.0, previous - seconds)
    for connection in pool.connections:
        level: Any  # a connection or the HTTP/1.1 or HTTP/2 one inside it; their private attributes are probed
        for level in (connection, getattr(connection, "_connection", None)):
            if level is None or not hasattr(level, "_keepalive_expiry"):
                continue
            level._keepalive_expiry = seconds  # private: the expiry set when its current response ends
            if getattr(level, "_expire_at", None) is not None:
                level._expire_at -= sooner  # private: an idle one: its deadline, brought forward
    return True


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
