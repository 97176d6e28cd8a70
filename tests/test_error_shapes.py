"""Which dialect's shape an error takes: the route's that matched, else the longest registered prefix."""

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from app.errors import InvalidRequest, MiniVaultError
from app.web.errors import Dialect, register_dialect, shapes_of
from app.web.responses import error_response


def _shape(name: str, status: int | None = None) -> Any:
    return lambda error, request_id: (status or error.status, {"shape": name, "message": error.message})


def _dialect(name: str, prefix: str, router: APIRouter, status: int | None = None) -> Dialect:
    return Dialect(name, prefix, router, _shape(name, status), lambda error, request_id: b"")


def _app() -> FastAPI:
    app = FastAPI()
    wide = APIRouter(prefix="/v1")
    narrow = APIRouter()

    @wide.post("/chat/completions")
    async def chat() -> None:
        raise InvalidRequest("bad chat")

    # A route of the narrower dialect outside its prefix (under the wide one): only the route says whose it is.
    @narrow.post("/v1/count_tokens")
    async def count() -> None:
        raise InvalidRequest("bad count")

    register_dialect(app, _dialect("wide", "/v1/", wide))
    register_dialect(app, _dialect("narrow", "/v1/messages", narrow, status=400))

    @app.middleware("http")
    async def refuse_before_routing(request: Any, call_next: Any) -> Any:
        if request.headers.get("x-refuse"):
            return error_response(MiniVaultError("refused early"), "r1", scope=request.scope)
        return await call_next(request)

    @app.exception_handler(MiniVaultError)
    async def render(request: Any, exc: MiniVaultError) -> Any:
        return error_response(exc, "r1", scope=request.scope)

    return app


def test_a_routes_errors_take_its_dialects_shape() -> None:
    with TestClient(_app()) as client:
        chat = client.post("/v1/chat/completions")
        count = client.post("/v1/count_tokens")
    assert (chat.status_code, chat.json()) == (422, {"shape": "wide", "message": "bad chat"})
    assert (count.status_code, count.json()) == (400, {"shape": "narrow", "message": "bad count"})


def test_before_routing_the_longest_prefix_decides_and_other_paths_get_minivaults_shape() -> None:
    with TestClient(_app()) as client:
        narrow = client.post("/v1/messages", headers={"x-refuse": "1"})
        wide = client.post("/v1/embeddings", headers={"x-refuse": "1"})
        own = client.post("/generate", headers={"x-refuse": "1"})
    assert (narrow.status_code, narrow.json()["shape"]) == (400, "narrow")
    assert (wide.status_code, wide.json()["shape"]) == (500, "wide")
    assert own.status_code == 500
    assert own.json() == {"error": {"code": "internal_error", "message": "refused early", "id": "r1"}}
    assert own.headers["x-request-id"] == "r1"


def test_an_app_without_dialects_renders_minivaults_shape() -> None:
    app = FastAPI()
    assert shapes_of(app).renderer({"path": "/v1/chat/completions"})(InvalidRequest("x"), "r") == (
        422, {"error": {"code": "invalid_request", "message": "x", "id": "r"}},
    )  # fmt: skip
