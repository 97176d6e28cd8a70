"""Connection guards: what a client may cost MiniVault before its request reaches the app (and the 401).

uvicorn's httptools protocol buffers a request head for as long as the client sends it (4 clients of
64 MB of headers held 2.45 GB), and gives no deadline for a head or a body, so slow clients can hold
every socket. `GuardedProtocol` is that protocol plus, per connection:

- a bound on the head (MINIVAULT_MAX_HEADER_BYTES): past it, `431 headers_too_large` and the connection closes;
- a deadline for the head (MINIVAULT_HEADER_TIMEOUT, from the connection or the head's first byte) and for
  silence within a body (MINIVAULT_BODY_TIMEOUT): `408 request_timeout` (when nothing was sent yet) and close;
- a cap on open connections (MINIVAULT_MAX_CONNECTIONS): a new connection over it closes the oldest one still
  sending its head (slowloris), else it gets `503 too_many_connections` with Retry-After.

Serve it with `uvicorn app.main:app --http app.web.connections:GuardedProtocol`, as `make run`, `minivault serve`
and the Dockerfile do. Per chunk it costs one attribute write, plus an add and a compare while a head arrives;
deadlines are checked by one sweep per server every half second, not by a timer per connection.
"""

import asyncio
import collections
import http
import logging
import resource
import signal
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import Settings, load_settings
from app.errors import HeadersTooLarge, MiniVaultError, RequestTimeout, TooManyConnections, error_body
from app.web.request_id import HEADER, new_request_id

logger = logging.getLogger(__name__)

# What `--http` takes (uvicorn resolves an import string itself).
PROTOCOL_PATH = "app.web.connections:GuardedProtocol"
DEFAULT_MAX_CONNECTIONS = 4096
# Descriptors kept free beside the upstream pool's: listening sockets, the log, SQLite, the embedded engine.
RESERVED_DESCRIPTORS = 64
SWEEP_SECONDS = 0.5
# After a 431 or 503, the rest of what the client sends is read and dropped for this long before the close:
# closing with unread data makes the kernel answer with a reset, and the client would lose the response.
LINGER_SECONDS = 2.0
MAX_LINGERING = 256  # beyond this many at once, refusals close at once (descriptors matter more then)
SUMMARY_SECONDS = 10.0  # at most one log line per window, however many connections are closed


@dataclass(frozen=True)
class ConnectionLimits:
    """The four bounds a guarded connection enforces."""

    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "ConnectionLimits":
        """The limits `settings` name; raises the descriptor limit to size the connection cap."""
        return cls(settings.max_header_bytes, settings.header_timeout, settings.body_timeout, connection_cap(settings))


def raise_descriptor_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (where allowed); returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def connection_cap(settings: Settings) -> int:
    """MINIVAULT_MAX_CONNECTIONS, or the default: 4096, or fewer to leave descriptors for the upstream's sockets."""
    budget = raise_descriptor_limit() - settings.upstream_max_connections - RESERVED_DESCRIPTORS
    if settings.max_connections is not None:
        if settings.max_connections > budget:
            logger.warning(
                "MINIVAULT_MAX_CONNECTIONS=%d leaves too few file descriptors for the upstream "
                "(MINIVAULT_UPSTREAM_MAX_CONNECTIONS=%d): at most %d fit under the limit",
                settings.max_connections, settings.upstream_max_connections, max(budget, 0),
            )  # fmt: skip
        return settings.max_connections
    return max(16, min(DEFAULT_MAX_CONNECTIONS, budget))


def _response(error: MiniVaultError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole `connection: close` response in MiniVault's error shape, written straight to the socket."""
    request_id = new_request_id()
    body = orjson.dumps(error_body(error, request_id))
    lines = [f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}".encode()]
    lines += [name + b": " + value for name, value in default_headers]
    headers = {**(error.headers or {}), "content-type": "application/json", "content-length": str(len(body)),
               HEADER: request_id, "connection": "close"}  # fmt: skip
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _ServerGuard:
    """One server's guarded connections and the sweep that enforces their deadlines."""

    def __init__(self, limits: ConnectionLimits, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.loop = loop
        self.connections: dict[GuardedProtocol, None] = {}
        # Those sending a head, oldest first: the ones a new connection over the cap may push out.
        self.heads: dict[GuardedProtocol, None] = {}
        # Those refused and reading out what the client still sends: closed first when room is needed.
        self.lingering: dict[GuardedProtocol, None] = {}
        self.interval = min(SWEEP_SECONDS, limits.header_timeout / 2, limits.body_timeout / 2)
        self.timer: asyncio.TimerHandle | None = None
        self.counts: collections.Counter[str] = collections.Counter()
        self.summary_due = 0.0

    def add(self, connection: "GuardedProtocol") -> None:
        self.connections[connection] = None
        if self.timer is None:
            self.timer = self.loop.call_later(self.interval, self.sweep)

    def discard(self, connection: "GuardedProtocol") -> None:
        self.connections.pop(connection, None)
        self.heads.pop(connection, None)
        self.lingering.pop(connection, None)

    def make_room(self) -> bool:
        """Close a refused connection still reading out, else the one sending its head the longest; False
        when there is neither."""
        for refused in self.lingering:
            self.discard(refused)
            refused.transport.close()
            return True
        for victim in self.heads:
            self.counts["evicted while sending their head (MINIVAULT_MAX_CONNECTIONS)"] += 1
            victim.close_with(RequestTimeout(
                "MiniVault closed this connection to make room: it was the slowest to send its request, "
                f"with MINIVAULT_MAX_CONNECTIONS ({self.limits.max_connections}) open; send the request at once."
            ))  # fmt: skip
            return True
        return False

    def sweep(self) -> None:
        """Close the connections past a deadline; runs every `interval` s while there are any."""
        now = self.loop.time()
        header_timeout, body_timeout = self.limits.header_timeout, self.limits.body_timeout
        for connection in list(self.connections):
            if connection._linger_until is not None:
                if now >= connection._linger_until:
                    self.discard(connection)
                    connection.transport.close()
                continue
            # Not reading (the app has not taken the body yet, pipelined requests wait): the client is not late.
            held = connection.flow.read_paused
            if connection._in_head:
                since = connection._head_since
                if since is None:
                    if connection._head_bytes:  # the next request on a kept-alive connection has begun
                        connection._head_since = now
                        self.heads[connection] = None
                elif held:
                    connection._head_since = now
                elif now - since > header_timeout:
                    self.counts["closed, head not received within MINIVAULT_HEADER_TIMEOUT"] += 1
                    connection.close_with(RequestTimeout(
                        f"The request head did not arrive within MINIVAULT_HEADER_TIMEOUT ({header_timeout:g} s); "
                        "send the request line and headers at once."
                    ))  # fmt: skip
            elif connection._active or held or connection.awaiting_100_continue():
                connection._active = False
                connection._body_since = now
            elif now - connection._body_since > body_timeout:
                self.counts["closed, body silent for MINIVAULT_BODY_TIMEOUT"] += 1
                connection.close_with(RequestTimeout(
                    f"The request body stopped arriving for MINIVAULT_BODY_TIMEOUT ({body_timeout:g} s); "
                    "send the body without pauses."
                ))  # fmt: skip
        if self.counts and now >= self.summary_due:
            logger.warning("connection guards, last %g s: %s", SUMMARY_SECONDS,
                           "; ".join(f"{count} {what}" for what, count in self.counts.items()))  # fmt: skip
            self.counts.clear()
            self.summary_due = now + SUMMARY_SECONDS
        keep_going = self.connections or self.counts
        self.timer = self.loop.call_later(self.interval, self.sweep) if keep_going else None


_guards: "weakref.WeakKeyDictionary[Any, _ServerGuard]" = weakref.WeakKeyDictionary()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with MiniVault's bounds on request heads, slow clients and connections."""

    # Set by `configure` at start-up (from the app's settings); else read from the environment on first use.
    limits: ClassVar[ConnectionLimits | None] = None

    @classmethod
    def configure(cls, settings: Settings) -> ConnectionLimits:
        """Take the limits from `settings` (raising the descriptor limit); returns them."""
        cls.limits = ConnectionLimits.from_settings(settings)
        return cls.limits

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        guard = _guards.get(server_state)
        if guard is None:
            limits = type(self).limits
            if limits is None:
                # No lifespan handed the app's own settings in (served some other way): read the environment.
                logger.warning("connection guards: limits read from the environment, not from the app's settings")
                limits = type(self).configure(load_settings())
            guard = _guards[server_state] = _ServerGuard(limits, self.loop)
        self._guard = guard
        self._max_head = guard.limits.max_header_bytes
        self._in_head = True  # the bytes arriving now belong to a request head (for the sweep)
        # Counted against MINIVAULT_MAX_HEADER_BYTES: the bytes of a head, and of a chunked body's trailer
        # section (header lines too, which the parser buffers the same way).
        self._counting = True
        self._head_bytes = 0
        self._head_since: float | None = None
        self._sections = 0  # counted sections that ended: the head, a chunk header, the trailers
        self._active = False  # a chunk arrived since the last sweep
        self._body_since = 0.0
        self._linger_until: float | None = None  # refused: reading and dropping until then
        self._upgraded = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self._guard
        self._head_since = self.loop.time()
        guard.add(self)
        if len(self.connections) > guard.limits.max_connections and not guard.make_room():
            guard.counts["refused over MINIVAULT_MAX_CONNECTIONS"] += 1
            self.refuse(TooManyConnections(
                f"MiniVault has MINIVAULT_MAX_CONNECTIONS ({guard.limits.max_connections}) connections open; "
                "retry in a moment.", {"Retry-After": "1"},
            ))  # fmt: skip
            return
        guard.heads[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._active = True
        if self._counting:
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._over_limit(data)
                return
        super().data_received(data)

    def _over_limit(self, data: bytes) -> None:
        if self._linger_until is not None:
            return  # refused already: drop what the client still sends
        # The chunk may hold the end of a head within the limit and a body after it: feed what fits, then see.
        fits = len(data) - (self._head_bytes - self._max_head)
        sections = self._sections
        if fits > 0:
            super().data_received(data[:fits])
        if self._sections == sections:
            if not self.transport.is_closing():  # (the parser may have refused it already, with a 400)
                self._guard.counts["refused, head over MINIVAULT_MAX_HEADER_BYTES"] += 1
                self.refuse(HeadersTooLarge(
                    f"The request head is over MINIVAULT_MAX_HEADER_BYTES ({self._max_head} bytes); "
                    "send fewer or shorter headers."
                ))  # fmt: skip
            return
        if not self._upgraded and not self.transport.is_closing():
            self.data_received(data[fits:])

    def on_headers_complete(self) -> None:
        self._in_head = self._counting = False
        self._sections += 1
        self._head_since = None
        self._guard.heads.pop(self, None)
        self._body_since = self.loop.time()
        super().on_headers_complete()

    # A chunked body: after each chunk's size line comes its data (ending the count), or, after the last
    # one, the trailer section, counted until the chunk completes.
    def on_chunk_header(self) -> None:
        self._counting = True
        self._head_bytes = 0

    def on_body(self, body: bytes) -> None:
        if self._counting:
            self._counting = False
            self._sections += 1
        super().on_body(body)

    def on_chunk_complete(self) -> None:
        if self._counting:
            self._counting = False
            self._sections += 1

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # What arrives next is the next request's head; its clock starts with its first byte (see the sweep).
        self._in_head = self._counting = True
        self._head_bytes = 0

    def handle_websocket_upgrade(self) -> None:
        # The websocket protocol takes the transport over; its own ping timeouts look after it from here.
        self._upgraded = True
        self._guard.discard(self)
        super().handle_websocket_upgrade()

    def awaiting_100_continue(self) -> bool:
        """The client waits for `100 Continue`, which uvicorn sends once the app reads the body."""
        return self.cycle is not None and self.cycle.waiting_for_100_continue

    def _nothing_sent(self) -> bool:
        """No response (or part of one) is on its way for this request, nor for one pipelined before it."""
        cycle = self.cycle
        return (cycle is None or cycle.response_complete or not cycle.response_started) and not self.pipeline

    def _cut_off_app(self) -> None:
        # The app's sends from now on go nowhere, and a receive() it waits in returns `http.disconnect`.
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def close_with(self, error: MiniVaultError) -> None:
        """Answer `error` when nothing was sent for this request yet, then close."""
        self._guard.discard(self)
        if self.transport.is_closing():
            return
        if self._nothing_sent():
            self.transport.write(_response(error, self.server_state.default_headers))
        self._cut_off_app()
        self.transport.close()

    def refuse(self, error: MiniVaultError) -> None:
        """Answer `error`, then read and drop for LINGER_SECONDS (or until the client closes) before closing."""
        if not self._nothing_sent():  # a pipelined answer is still going out: no room for this one
            self.close_with(error)
            return
        guard = self._guard
        guard.heads.pop(self, None)
        self._counting, self._max_head = True, -1  # every chunk from now on takes the dropping path
        self.transport.write(_response(error, self.server_state.default_headers))
        self._cut_off_app()
        if len(guard.lingering) >= MAX_LINGERING or not self.transport.can_write_eof():
            guard.discard(self)
            self.transport.close()
            return
        self.transport.write_eof()  # the client reads the answer and its end; we keep reading until it closes
        self._linger_until = self.loop.time() + LINGER_SECONDS
        guard.lingering[self] = None


def check_connection_guards(settings: Settings) -> None:
    """At start-up: hand `settings` to the guarded protocol, or warn once that uvicorn serves without it.

    uvicorn's signal handler is a bound method of its Server, whose config names the protocol class; it is
    only found under uvicorn's own `run` (CLI, `minivault serve`), and the check stays silent elsewhere.
    """
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    protocol = getattr(getattr(server, "config", None), "http_protocol_class", None)
    if not isinstance(protocol, type):
        return
    if issubclass(protocol, GuardedProtocol):
        limits = protocol.configure(settings)
        logger.info(
            "connection guards on: heads up to %d bytes within %g s, bodies silent at most %g s, %d connections",
            limits.max_header_bytes, limits.header_timeout, limits.body_timeout, limits.max_connections,
        )  # fmt: skip
        return
    logger.warning(
        "connection guards are off: uvicorn serves MiniVault with %s, so one client can exhaust its memory or "
        "sockets before auth (no MINIVAULT_MAX_HEADER_BYTES, MINIVAULT_HEADER_TIMEOUT, MINIVAULT_BODY_TIMEOUT or "
        "MINIVAULT_MAX_CONNECTIONS); start it with `make run`, `minivault serve`, or uvicorn's `--http %s`",
        protocol.__name__, PROTOCOL_PATH,
    )  # fmt: skip


__all__ = ["PROTOCOL_PATH", "ConnectionLimits", "GuardedProtocol", "check_connection_guards"]
