"""The errors MiniVault reports, each with its HTTP status and stable code.

Upstream clients translate transport failures into these at the boundary, so routes
and the log only ever see this hierarchy.
"""

from typing import Any, ClassVar


class MiniVaultError(Exception):
    """Base class: `code` is the stable machine name, `message` tells the user what to do."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self, request_id: str) -> dict[str, Any]:
        """The `{"code", "message", "id"}` object shared by bodies and stream frames."""
        return {"code": self.code, "message": self.message, "id": request_id}


class InvalidRequest(MiniVaultError):
    """The request body is not what the API accepts."""

    status = 422
    code = "invalid_request"


class ModelNotFound(MiniVaultError):
    """The upstream does not have the model asked for."""

    status = 404
    code = "model_not_found"


class BackendUnavailable(MiniVaultError):
    """The upstream cannot be reached at all (refused, DNS, not running)."""

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


class NotSupported(MiniVaultError):
    """The backend in use cannot do this (for example pulling a model anywhere but Ollama)."""

    status = 501
    code = "not_supported"


class RouteNotFound(MiniVaultError):
    """No route matches the path."""

    status = 404
    code = "not_found"


class MethodNotAllowed(MiniVaultError):
    """The route exists but not for this HTTP method."""

    status = 405
    code = "method_not_allowed"


def error_body(error: MiniVaultError, request_id: str) -> dict[str, Any]:
    """The REST error body, `{"error": {"code", "message", "id"}}`."""
    return {"error": error.to_dict(request_id)}
