"""API keys: every route but /health, /ready and the browser pages needs one when MINIVAULT_API_KEYS or
MINIVAULT_ADMIN_KEYS is set (an admin key is also a key).

A pure ASGI middleware, so one check covers HTTP and websockets alike and runs before any
route. Keys are compared as sha256 digests with `hmac.compare_digest`, against every configured
key, so neither the match nor its position leaks through timing. The key itself is never
stored or logged: exchanges carry `key_id`, the first 8 hex digits of its sha256.
"""

import hashlib
import hmac
from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.caller import Caller
from app.errors import Unauthorized
from app.routes.pages import OPEN_PATHS as PAGE_PATHS
from app.routes.pages import OPEN_PREFIXES as PAGE_PREFIXES
from app.schemas import Endpoint
from app.web.request_id import client_of, request_id_of
from app.web.responses import error_response, send_ws_error

# The pages hold no data: the playground and the docs ask for the key themselves, then send it.
OPEN_PATHS = frozenset({"/health", "/ready"}) | PAGE_PATHS
_MISSING = (
    "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>` "
    "(websocket: either header, or the `api_key` query parameter)"
)
_WRONG = "the API key is not valid: check it against MINIVAULT_API_KEYS and MINIVAULT_ADMIN_KEYS (sent as " \
    "`Authorization: Bearer <key>` or `X-API-Key: <key>`)"  # fmt: skip


def key_id(key: str) -> str:
    """The name a key goes by in logs and metrics: the first 8 hex digits of its sha256."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def key_id_of(connection: HTTPConnection) -> str | None:
    """The key_id the middleware accepted for this request, None when auth is off."""
    return connection.scope["state"].get("key_id")


def visible_to(connection: HTTPConnection) -> str | None:
    """The key_id whose exchanges and conversations alone the caller may see; None (all) for an admin key
    or with auth off."""
    return None if is_admin(connection) else key_id_of(connection)


def caller_of(connection: HTTPConnection, endpoint: Endpoint) -> Caller:
    """Who is asking, built once per request (per prompt on a websocket) from what the edge established."""
    state = connection.scope["state"]
    key_id = state.get("key_id")
    return Caller(
        state["request_id"], endpoint, client_of(connection), key_id, key_id is None or state.get("key_admin", False)
    )


def is_admin(connection: HTTPConnection) -> bool:
    """Whether the caller may manage models and see every key's data: an admin key, or auth is off."""
    state = connection.scope["state"]
    return state.get("key_id") is None or state.get("key_admin", False)


class ApiKeyMiddleware:
    """Refuses requests without a configured key with 401 `unauthorized` (websocket: error frame, close 1008).

    `on_refused(code)` is told of each refusal (the metrics counter).
    """

    def __init__(
        self,
        app: ASGIApp,
        digests: list[bytes],
        on_refused: Callable[[str], None] | None = None,
        admin_digests: list[bytes] | None = None,
    ) -> None:
        self.app = app
        self._digests = digests
        self._admin_digests = admin_digests or []
        self._on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope["path"] in OPEN_PATHS or scope["path"].startswith(PAGE_PREFIXES):
            await self.app(scope, receive, send)
            return
        key = _presented_key(scope)
        presented = hashlib.sha256(key.encode()).digest() if key is not None else None
        if presented is not None and _matches(presented, self._digests):
            state = scope["state"]
            state["key_id"] = presented.hex()[:8]  # key_id(key), from the digest already made
            state["key_admin"] = _matches(presented, self._admin_digests)
            await self.app(scope, receive, send)
            return
        error = Unauthorized(_MISSING if key is None else _WRONG)
        if self._on_refused is not None:
            self._on_refused(error.code)
        request_id = request_id_of(HTTPConnection(scope))
        if kind == "websocket":
            await send_ws_error(receive, send, error, request_id)
        else:
            headers = {"WWW-Authenticate": 'Bearer realm="minivault"'}
            await error_response(error, request_id, headers, scope)(scope, receive, send)


def _matches(presented: bytes, digests: list[bytes]) -> bool:
    found = False
    for digest in digests:  # no early exit: the time taken does not depend on which key matched
        found |= hmac.compare_digest(presented, digest)
    return found


def _presented_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value:
            return value.decode("latin-1").strip()
    if scope["type"] == "websocket" and scope.get("query_string"):
        keys = parse_qs(scope["query_string"].decode("latin-1")).get("api_key")
        if keys:
            return keys[0]
    return None
