"""The errors MiniVault reports, each with its HTTP status and stable code.

Upstream clients translate transport failures into these at the boundary, so routes
and the log only ever see this hierarchy.
"""

from typing import Any, ClassVar

# Websocket close codes (RFC 6455) MiniVault closes with; most errors keep the socket open.
WS_POLICY_VIOLATION = 1008
WS_MESSAGE_TOO_BIG = 1009
WS_GOING_AWAY = 1001


class MiniVaultError(Exception):
    """Base class: `code` is the stable machine name, `message` tells the user what to do.

    `headers` go on the HTTP response (Retry-After); `ws_close`, when set, is the close code a
    websocket ends with after the error frame (None: the socket stays open for the next prompt).
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    ws_close: ClassVar[int | None] = None
    # The request field at fault, when there is one (OpenAI's error bodies name it as `param`).
    param: str | None = None

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers

    def to_dict(self, request_id: str) -> dict[str, Any]:
        """The `{"code", "message", "id"}` object shared by bodies and stream frames."""
        return {"code": self.code, "message": self.message, "id": request_id}


class InvalidRequest(MiniVaultError):
    """The request body is not what the API accepts."""

    status = 422
    code = "invalid_request"


class MissingCapability(InvalidRequest):
    """The model cannot do what the request needs (tools, vision, thinking, insert): 400 on every API, as Ollama
    answers it, since the body itself is valid."""

    status = 400
    code = "missing_capability"


class ContextTooLong(InvalidRequest):
    """The newest message (with the system prompt) cannot fit the model's context even with older turns dropped:
    400, as OpenAI answers it."""

    status = 400
    code = "context_length_exceeded"


class ModelNotFound(MiniVaultError):
    """The upstream does not have the model asked for."""

    status = 404
    code = "model_not_found"


class BackendUnavailable(MiniVaultError):
    """The upstream cannot be reached at all (refused, DNS, not running), or is still loading."""

    status = 503
    code = "backend_unavailable"


class BackendTimeout(MiniVaultError):
    """The upstream did not connect or send its next bytes in time."""

    status = 504
    code = "backend_timeout"


class BackendError(MiniVaultError):
    """The upstream answered with an error, a malformed line, or a stream cut short."""

    status = 502
    code = "backend_error"


class Unauthorized(MiniVaultError):
    """No API key, or one MiniVault does not know."""

    status = 401
    code = "unauthorized"
    ws_close = WS_POLICY_VIOLATION


class PayloadTooLarge(MiniVaultError):
    """The body (or websocket message) is over MINIVAULT_MAX_BODY_BYTES."""

    status = 413
    code = "payload_too_large"
    ws_close = WS_MESSAGE_TOO_BIG


class Busy(MiniVaultError):
    """MiniVault's queue (or Ollama's) is full; retry after `retry_after` seconds."""

    status = 429
    code = "busy"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, {"Retry-After": str(retry_after)})
        self.retry_after = retry_after

    def to_dict(self, request_id: str) -> dict[str, Any]:
        return {**super().to_dict(request_id), "retry_after": self.retry_after}


class RateLimited(Busy):
    """The API key sent more than MINIVAULT_RATE_LIMIT prompts in the last minute; retry after `retry_after` s."""

    code = "rate_limited"


class ShuttingDown(MiniVaultError):
    """MiniVault is stopping: new work is refused, and work past the grace period is ended."""

    status = 503
    code = "shutting_down"
    ws_close = WS_GOING_AWAY


class ModelLoading(MiniVaultError):
    """The default model is still being pulled into Ollama (MINIVAULT_AUTO_PULL); the message has the progress."""

    status = 503
    code = "model_loading"


class NotSupported(MiniVaultError):
    """The backend in use cannot do this (for example pulling a model anywhere but Ollama)."""

    status = 501
    code = "not_supported"


class NotFound(MiniVaultError):
    """No such thing behind an existing route: a conversation, an exchange in the history."""

    status = 404
    code = "not_found"


class RouteNotFound(NotFound):
    """No route matches the path."""


class MethodNotAllowed(MiniVaultError):
    """The route exists but not for this HTTP method."""

    status = 405
    code = "method_not_allowed"


def error_body(error: MiniVaultError, request_id: str) -> dict[str, Any]:
    """The REST error body, `{"error": {"code", "message", "id"}}`."""
    return {"error": error.to_dict(request_id)}


# --- A key is not root: model management needs an admin key; registries; the queue share.


class Forbidden(MiniVaultError):
    """The key is known but may not do this (model management needs an admin key)."""

    status = 403
    code = "forbidden"


class RegistryNotAllowed(Forbidden):
    """A model name names a registry host MINIVAULT_PULL_REGISTRIES does not list, or asks for `insecure`."""

    code = "registry_not_allowed"


class PushNotAllowed(Forbidden):
    """`/api/push` sends a model off this machine; MINIVAULT_ALLOW_PUSH is off."""

    code = "push_not_allowed"


class QueueShareExceeded(Busy):
    """The key already holds MINIVAULT_MAX_QUEUE_PER_KEY places in the queue; retry after `retry_after` s."""

    code = "queue_share_exceeded"


# --- The web edge (app/web/edge.py): the Host, Origin and Content-Type checks.


class HostNotAllowed(MiniVaultError):
    """The Host header names a server MiniVault does not serve (DNS rebinding); see MINIVAULT_ALLOWED_HOSTS."""

    status = 403
    code = "host_not_allowed"
    ws_close = WS_POLICY_VIOLATION


class OriginNotAllowed(MiniVaultError):
    """A web page of another origin, not listed in MINIVAULT_CORS_ORIGINS, sent the request."""

    status = 403
    code = "origin_not_allowed"
    ws_close = WS_POLICY_VIOLATION


class UnsupportedMediaType(MiniVaultError):
    """A body that is not declared as JSON (`Content-Type: application/json` or a `+json` type)."""

    status = 415
    code = "unsupported_media_type"


# --- Cheap refusals: a websocket that keeps sending invalid frames is closed.


class TooManyInvalidFrames(MiniVaultError):
    """A websocket sent more than MINIVAULT_WS_MAX_INVALID_FRAMES invalid frames within 10 s; closed with 1008."""

    status = 429
    code = "too_many_invalid_frames"
    ws_close = WS_POLICY_VIOLATION


# --- History search: a search that would run too long is stopped.


class QueryTooExpensive(MiniVaultError):
    """A history search ran past MINIVAULT_HISTORY_QUERY_SECONDS and was stopped; narrow it and retry."""

    status = 422
    code = "query_too_expensive"


# --- Connection guards (app/web/connections.py): refusals written before the app runs.


class HeadersTooLarge(MiniVaultError):
    """The request head (request line and headers) is over MINIVAULT_MAX_HEADER_BYTES; the connection is closed."""

    status = 431
    code = "headers_too_large"


class RequestTimeout(MiniVaultError):
    """The request head or body did not arrive in time (MINIVAULT_HEADER_TIMEOUT, MINIVAULT_BODY_TIMEOUT)."""

    status = 408
    code = "request_timeout"


class TooManyConnections(MiniVaultError):
    """MINIVAULT_MAX_CONNECTIONS client connections are open and none can be let go; retry shortly."""

    status = 503
    code = "too_many_connections"
