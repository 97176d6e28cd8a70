"""The web edge: what a browser could make MiniVault do for a page the user happens to have open.

Three checks, on HTTP and websockets alike, before CORS, the API key and any route:

- **Host** (DNS rebinding): on a connection that arrived at a loopback address, only `localhost`,
  `127.0.0.1`, `[::1]` (any port) and the names in MINIVAULT_ALLOWED_HOSTS are served; elsewhere any
  Host is, unless the setting is given. 403 `host_not_allowed`.
- **Origin**: a request a web page sent (it has an `Origin`) is served only from MiniVault's own origin
  or one listed in MINIVAULT_CORS_ORIGINS; `Origin: null` (sandboxed frames, file://) is foreign. No
  `Origin` (curl, the SDKs, the CLI) passes. 403 `origin_not_allowed`; a websocket gets the error frame,
  then close 1008. Websockets have no same-origin rule in browsers, so this check is their only one.
- **JSON means JSON**: a POST, PUT, PATCH or DELETE with a body, or with any Content-Type, must declare
  `application/json` or a `+json` type; otherwise 415 `unsupported_media_type`. The three types a page
  may send without a CORS preflight (text/plain, form data) are thereby never parsed as JSON. Ollama's
  blob upload (`/api/blobs/...`) takes raw bytes: there only those three form types are refused.

Pure ASGI and one pass over the headers, with the allowed sets built once: it sits in front of every request.
"""

import ipaddress
import re
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import HostNotAllowed, MiniVaultError, OriginNotAllowed, UnsupportedMediaType
from app.web.request_id import new_request_id
from app.web.responses import error_response, send_ws_error

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# What a page may send cross-origin without a preflight (the Fetch standard's CORS-safelisted types).
_FORM_TYPES = frozenset({"text/plain", "multipart/form-data", "application/x-www-form-urlencoded"})
_BLOB_PREFIX = "/api/blobs/"
_TOKEN = r"[!#$%&'*+.^_`|~0-9a-z-]+"
_JSON_TYPE = re.compile(rf"application/json|{_TOKEN}/{_TOKEN}\+json")
# Decisions keyed by header bytes: clients repeat the same few values; an attacker's variety is not cached.
_CACHE_LIMIT = 256


def _name_of(authority: str) -> str:
    """`host[:port]` (lower case) without the port or a trailing dot; `[v6]` keeps its brackets."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] if end > 0 else authority
    name, colon, port = authority.rpartition(":")
    if not colon or not (port.isdigit() or not port):
        name = authority
    return name[:-1] if name.endswith(".") else name


def _is_loopback_address(server: tuple[str, int | None] | None) -> bool:
    """Whether the connection arrived at a loopback address (uvicorn's `server` is the socket's own end).

    A unix socket (a path, no port) counts as loopback: only this machine reaches it. So does an unknown
    address, the safe side.
    """
    if server is None:
        return True
    host, port = server
    if host == "localhost" or (port is None and (not host or host[0] in "/\0")):
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _media_type(value: bytes) -> str:
    return value.split(b";", 1)[0].strip().decode("latin-1").lower()


def _shown(value: bytes | str, limit: int = 100) -> str:
    """A header value fit to quote in a message: bounded, its control characters escaped."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


class WebGuardMiddleware:
    """Refuses foreign Host names (403), foreign origins (403; websocket: close 1008) and non-JSON bodies (415).

    `on_refused(code)` is told of each refusal (the metrics counter).
    """

    def __init__(
        self,
        app: ASGIApp,
        allowed_hosts: list[str],
        allowed_origins: list[str],
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        entries = [host.strip().lower() for host in allowed_hosts if host.strip()]
        self._any_host = "*" in entries
        # Unset: loopback names only where the connection is loopback; given: those names everywhere.
        self._restricted_everywhere = bool(entries) and not self._any_host
        names, authorities = set(LOOPBACK_NAMES), set()
        for entry in entries:
            entry = _bracketed(entry)
            # `mv.example` serves any port; `mv.example:8443` only that one.
            if _name_of(entry) == entry.rstrip("."):
                names.add(_name_of(entry))
            else:
                authorities.add(entry)
        self._names = frozenset(names)
        self._authorities = frozenset(authorities)
        origins = [origin.strip().lower().rstrip("/") for origin in allowed_origins if origin.strip()]
        self._any_origin = "*" in origins
        self._origins = frozenset(origins)
        self._on_refused = on_refused
        self._hosts: dict[bytes, bool] = {}
        self._loopback: dict[object, bool] = {}
        self._json_types: dict[bytes, bool] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        host = origin = content_type = None
        has_body = False
        for name, value in scope["headers"]:
            if name == b"host":
                if host is not None and value != host:
                    host = b"\x00"  # two different Host headers: neither can be trusted
                else:
                    host = value
            elif name == b"origin":
                origin = value
            elif name == b"content-type":
                content_type = value if content_type is None or content_type == value else b"\x00"
            elif name == b"content-length":
                has_body = has_body or value.strip(b" \t0") != b""
            elif name == b"transfer-encoding":
                has_body = True
        error = None
        if host is not None and not self._host_allowed(scope, host):
            error = self._foreign_host(host)
        elif origin is not None and not self._origin_allowed(origin, host):
            error = OriginNotAllowed(
                f"a web page at {_shown(origin)} sent this request; MiniVault answers only its own pages and the "
                "origins listed in MINIVAULT_CORS_ORIGINS (add that origin there to let the site call MiniVault)"
            )
        elif kind == "http" and (content_type is not None or has_body) and scope["method"] in _BODY_METHODS:
            error = self._media_error(scope["path"], content_type)
        if error is None:
            await self.app(scope, receive, send)
            return
        if self._on_refused is not None:
            self._on_refused(error.code)
        # Set by RequestIdMiddleware, which runs first so that refusals carry the id too.
        request_id = scope.get("state", {}).get("request_id") or new_request_id()
        if kind == "websocket":
            await send_ws_error(receive, send, error, request_id)
        else:
            await error_response(error, request_id, scope=scope)(scope, receive, send)

    def _host_allowed(self, scope: Scope, host: bytes) -> bool:
        if self._any_host:
            return True
        if not self._restricted_everywhere:
            server = scope.get("server")
            loopback = self._loopback.get(server)
            if loopback is None:
                loopback = _is_loopback_address(server)
                if len(self._loopback) < _CACHE_LIMIT:
                    self._loopback[server] = loopback
            if not loopback:
                return True
        allowed = self._hosts.get(host)
        if allowed is None:
            authority = host.decode("latin-1").strip().lower()
            allowed = authority in self._authorities or _name_of(authority) in self._names
            if len(self._hosts) < _CACHE_LIMIT:
                self._hosts[host] = allowed
        return allowed

    def _foreign_host(self, host: bytes) -> MiniVaultError:
        where = "" if self._restricted_everywhere else "MiniVault listens on a loopback address, so "
        return HostNotAllowed(
            f"the Host {_shown(host)} is not served: {where}only localhost, 127.0.0.1, [::1] and the names in "
            "MINIVAULT_ALLOWED_HOSTS are (a foreign name on a local server is how DNS rebinding reaches it); "
            "add the name to MINIVAULT_ALLOWED_HOSTS to serve it"
        )

    def _origin_allowed(self, origin: bytes, host: bytes | None) -> bool:
        if self._any_origin:
            return True
        text = origin.decode("latin-1").strip().lower().rstrip("/")
        if text in self._origins:
            return True
        # Same-origin: the page came from this very Host. Schemes are not compared, so a TLS proxy that
        # passes Host on still counts; another scheme on the same host and port is MiniVault itself.
        scheme, sep, authority = text.partition("://")
        return bool(sep) and host is not None and scheme in ("http", "https") and authority == _lower(host)

    def _media_error(self, path: str, content_type: bytes | None) -> UnsupportedMediaType | None:
        if path.startswith(_BLOB_PREFIX):
            # Raw bytes, sent with no type or application/octet-stream (Ollama's Go client says JSON).
            if content_type is None or _media_type(content_type) not in _FORM_TYPES:
                return None
        elif content_type is not None:
            is_json = self._json_types.get(content_type)
            if is_json is None:
                is_json = _JSON_TYPE.fullmatch(_media_type(content_type)) is not None
                if len(self._json_types) < _CACHE_LIMIT:
                    self._json_types[content_type] = is_json
            if is_json:
                return None
        got = "no Content-Type" if content_type is None else f"Content-Type {_shown(content_type)}"
        if path.startswith(_BLOB_PREFIX):
            return UnsupportedMediaType(
                f"a blob is raw bytes: send it with `Content-Type: application/octet-stream` (got {got})"
            )
        return UnsupportedMediaType(
            f"the body must be JSON: send it with `Content-Type: application/json` (got {got}; a web page on any "
            "site can send that, so MiniVault never reads it as JSON)"
        )


def _bracketed(entry: str) -> str:
    """A bare IPv6 address in MINIVAULT_ALLOWED_HOSTS as a Host header writes it, `[::1]`."""
    try:
        return f"[{entry}]" if isinstance(ipaddress.ip_address(entry), ipaddress.IPv6Address) else entry
    except ValueError:
        return entry


def _lower(value: bytes) -> str:
    return value.decode("latin-1").strip().lower()
