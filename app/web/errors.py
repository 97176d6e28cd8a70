"""Which shape an error takes: MiniVault's own, or the dialect's that serves the route.

Each dialect registers its routes and its error body here (`register_dialect`); a route's errors
take its dialect's shape, and an error raised before routing (keys, body limits, the web guard)
falls back to the longest registered path prefix, so `/v1/messages` can answer Anthropic's shape
beside OpenAI's `/v1/chat/completions`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.types import Scope

from app.errors import MiniVaultError, error_body

# (error, request id) -> (status, body): a dialect may change the status too (Ollama answers 400 for 422).
ErrorRenderer = Callable[[MiniVaultError, str], tuple[int, dict[str, Any]]]


def minivault_error(error: MiniVaultError, request_id: str) -> tuple[int, dict[str, Any]]:
    """MiniVault's own shape: `{"error": {"code", "message", "id"}}` with the error's status."""
    return error.status, error_body(error, request_id)


@dataclass(frozen=True, slots=True)
class Dialect:
    """Another API MiniVault speaks: its routes, the prefix its paths share, and its error shapes."""

    name: str
    prefix: str
    router: APIRouter
    error: ErrorRenderer
    # The last frame of a stream that fails after its first token, in the dialect's stream format.
    stream_error: Callable[[MiniVaultError, str], bytes]


class ErrorShapes:
    """The registered dialects' renderers, by route path and by path prefix."""

    def __init__(self) -> None:
        self._by_route: dict[str, ErrorRenderer] = {}
        self._by_prefix: list[tuple[str, ErrorRenderer]] = []

    def add(self, dialect: Dialect) -> None:
        for route in dialect.router.routes:
            self._by_route[route.path] = dialect.error  # type: ignore[attr-defined]
        self._by_prefix.append((dialect.prefix, dialect.error))
        self._by_prefix.sort(key=lambda entry: len(entry[0]), reverse=True)

    def renderer(self, scope: Scope) -> ErrorRenderer:
        """The renderer of the route that matched, else of the longest prefix of the path, else MiniVault's."""
        route = scope.get("route")
        if route is not None and (found := self._by_route.get(getattr(route, "path", ""))) is not None:
            return found
        path = scope.get("path", "")
        for prefix, render in self._by_prefix:
            if path.startswith(prefix):
                return render
        return minivault_error


def register_dialect(app: FastAPI, dialect: Dialect) -> None:
    """Serve the dialect's routes and render their errors in its shape."""
    app.include_router(dialect.router)
    shapes_of(app).add(dialect)


def shapes_of(app: Any) -> ErrorShapes:
    """The app's registry (created on first use; an app without dialects renders MiniVault's shape)."""
    state = app.state
    shapes = getattr(state, "error_shapes", None)
    if shapes is None:
        shapes = state.error_shapes = ErrorShapes()
    return shapes
