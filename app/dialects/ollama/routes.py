"""The Ollama-compatible API: `/api/generate`, `/api/chat`, `/api/tags`, `/api/show`, `/api/ps` and
`/api/version` over whichever backend is configured, so Ollama's clients (its Python and JavaScript
libraries, Open WebUI, editors) can use MiniVault, the embedded engine included.

Generation goes through the service like `/generate` (auth, limits, timeouts, the log with
`endpoint: "ollama"`, the history). Model management (`/api/pull`, `/api/delete`, ...) only means
something to a real Ollama: it is passed through to it, and refused with 501 on other backends. It
needs an admin key, and the names it sends must pass the registry rules (app.core.model_policy).
Errors take Ollama's shape, `{"error": "..."}`.
"""

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from app.backends import Backend, HostPool, ModelInfo, OllamaBackend, SupportsForward
from app.core.model_policy import MANAGEMENT_PATHS, NAMING_PATHS, ModelManagement
from app.dialects.ollama import wire as ollama
from app.dialects.relay import answer, read_exchange
from app.errors import InvalidRequest, ModelNotFound, NotSupported
from app.schemas import describe_validation_errors, reject_non_finite
from app.web.errors import Dialect
from app.web.responses import OrjsonResponse

router = APIRouter(prefix="/api", tags=["Ollama-compatible"])


class OllamaErrorBody(BaseModel):
    """Every error on /api, in Ollama's shape; a bad request is 400, as Ollama answers it."""

    error: str


_DESCRIPTIONS = {
    400: "the body is not valid, or asks for something MiniVault cannot do (the message says which field)",
    403: "model management needs an admin key (MINIVAULT_ADMIN_KEYS), or the name's registry host is not in "
    "MINIVAULT_PULL_REGISTRIES, or `insecure`/push is off (MINIVAULT_ALLOW_INSECURE_REGISTRIES, MINIVAULT_ALLOW_PUSH)",
    404: "the model is not there",
    413: "the body is over MINIVAULT_MAX_BODY_BYTES",
    429: "MiniVault's queue is full, or this key holds its share of it (Retry-After says when to retry)",
    501: "the backend is not Ollama, so it has no models to manage",
    502: "the upstream failed",
    503: "the upstream cannot be reached, MiniVault is shutting down, or the model is being pulled",
    504: "the upstream did not answer in time",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": OllamaErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


_GENERATION_ERRORS = _errors(400, 404, 413, 429, 502, 503, 504)
_NDJSON = "application/x-ndjson"


def _body(schema: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{schema}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _ok(description: str, example: dict[str, Any], stream_example: str | None = None) -> dict[int | str, Any]:
    content: dict[str, Any] = {"application/json": {"example": example}}
    if stream_example is not None:
        content[_NDJSON] = {"schema": {"type": "string"}, "example": stream_example}
    return {200: {"description": description, "content": content}}


def _answers(description: str, examples: dict[str, Any], lines: dict[str, Any]) -> dict[int | str, Any]:
    """A generation's 200: worked examples of its answers (text, thinking, tool calls), whole and as NDJSON."""
    content = {"application/json": {"examples": examples}, _NDJSON: {"schema": {"type": "string"}, "examples": lines}}
    return {200: {"description": description, "content": content}}


@router.post(
    "/generate",
    responses={
        **_answers(
            "One object with `stream: false`; else NDJSON lines, the last with `done: true` and the counts. With "
            "`think`, the thinking as `thinking` (lines of their own before the answer's).",
            ollama.GENERATE_ANSWERS,
            ollama.GENERATE_LINES,
        ),
        **_GENERATION_ERRORS,
    },
    openapi_extra=_body("GenerateBody"),
)
async def generate(request: Request) -> Response:
    """Ollama's generate: a prompt in, the answer out (NDJSON unless `stream: false`)."""
    body, exchange = await read_exchange(request, "ollama", ollama.parse_generate)
    return await _answer(request, body, exchange, chat=False)


@router.post(
    "/chat",
    responses={
        **_answers(
            "One object with `stream: false`; else NDJSON lines, the last with `done: true` and the counts. With "
            "`think`, `message.thinking`; with `tools`, the calls as `message.tool_calls` (a line holds whole calls).",
            ollama.CHAT_ANSWERS,
            ollama.CHAT_LINES,
        ),
        **_GENERATION_ERRORS,
    },
    openapi_extra=_body("ChatBody"),
)
async def chat(request: Request) -> Response:
    """Ollama's chat: messages in, the assistant's next message out (NDJSON unless `stream: false`)."""
    body, exchange = await read_exchange(request, "ollama", ollama.parse_chat)
    return await _answer(request, body, exchange, chat=True)


async def _answer(request: Request, body: ollama.GenerateBody | ollama.ChatBody, exchange: Any, chat: bool) -> Response:
    if exchange is None:
        # No prompt: Ollama loads the model and says so; so does MiniVault, on any backend.
        backend: Backend = request.app.state.backend
        if isinstance(backend, (OllamaBackend, HostPool)):
            # Ollama's keep_alive too: 0 unloads the model (Open WebUI's Unload), and Ollama answers "unload".
            await backend.warm(body.model, body.keep_alive)
            reason = "unload" if ollama.unloads(body.keep_alive) else "load"
            return OrjsonResponse(ollama.loaded(body.model, chat, reason))
        if not isinstance(backend, SupportsForward):
            await _find(backend, body.model)  # Ollama's warm-up says 404 itself; other backends' do not check
        # The other backends keep their models loaded whatever keep_alive says, so the answer stays "load".
        await backend.warm(body.model)
        return OrjsonResponse(ollama.loaded(body.model, chat))
    lines = ollama.LineStream(exchange, chat)
    return await answer(
        request, exchange, stream=body.stream, whole=lines.whole, token=lines.token, end=lines.end,
        on_error=DIALECT.stream_error, media_type=_NDJSON,
    )  # fmt: skip


_TAG_EXAMPLE = {
    "name": "tinyllama:1.1b-chat", "model": "tinyllama:1.1b-chat", "modified_at": "2026-11-01T10:00:00Z",
    "size": 637700138, "digest": "2644915ede35", "details": {"family": "llama", "parameter_size": "1B"},
}  # fmt: skip


@router.get(
    "/tags", responses={**_ok("The models the backend has.", {"models": [_TAG_EXAMPLE]}), **_errors(502, 503, 504)}
)
async def tags(request: Request) -> Response:
    """The models the backend has, as Ollama lists them (`modified_at`: the model file's time, where known)."""
    backend: Backend = request.app.state.backend
    if isinstance(backend, SupportsForward):
        return await _forwarded(backend, request)
    return OrjsonResponse({"models": [ollama.tag(m) for m in await backend.list_models()]})


class ShowBody(BaseModel):
    """The body of `POST /api/show` (`name` is the older spelling of `model`)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _older_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and "model" not in data and "name" in data:
            return {**data, "model": data["name"]}
        return data


@router.post(
    "/show",
    responses={
        **_ok(
            "What Ollama knows of the model (on other backends: its details, and the capabilities MiniVault "
            "accepts for it: `completion`, `tools`, `vision`, `thinking`, `insert`).",
            {
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": _TAG_EXAMPLE["details"],
                "model_info": {},
                "capabilities": ["completion", "tools"],
                "modified_at": "2026-11-01T10:00:00Z",
            },
        ),  # fmt: skip
        **_errors(400, 404, 502, 503, 504),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": ShowBody.model_json_schema(),
                    "example": {"model": "tinyllama:1.1b-chat"},
                }
            },
        }
    },  # fmt: skip
)
async def show(request: Request) -> Response:
    """Details of one model and what it can be asked for (`capabilities`); 404 when the backend does not have it."""
    backend: Backend = request.app.state.backend
    example = '{"model": "llama3"}'
    raw = await request.body()
    reject_non_finite(raw)
    try:
        body = ShowBody.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_errors(exc, example)) from None
    name = body.model
    if isinstance(backend, SupportsForward):
        return await _forwarded(backend, request)
    info = await _find(backend, name)
    return OrjsonResponse(
        {
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": info.details,
            "model_info": {},
            "capabilities": sorted(await backend.capabilities(info.name)),
            "modified_at": info.modified_at,
        }  # fmt: skip
    )


_PS_EXAMPLE = {
    "name": "tinyllama:1.1b-chat", "model": "tinyllama:1.1b-chat", "size": 637700138, "digest": "2644915ede35",
    "details": _TAG_EXAMPLE["details"], "expires_at": "2318-03-13T04:03:40Z", "size_vram": 0, "context_length": 2048,
}  # fmt: skip
# Ollama's expiry for a model kept loaded for good (keep_alive -1): now plus Go's longest time.Duration.
_FOREVER = timedelta(microseconds=2**63 // 1000)


@router.get(
    "/ps",
    responses={
        **_ok("The models loaded now. Other backends keep what they serve loaded: `expires_at` is far in the "
              "future, as Ollama shows a model kept with keep_alive -1; `size_vram` is 0 (MiniVault does not know "
              "an OpenAI-compatible server's), `context_length` the embedded engine's per-request context.",
              {"models": [_PS_EXAMPLE]}),
        **_errors(502, 503, 504),
    },
)  # fmt: skip
async def ps(request: Request) -> Response:
    """The models in memory, with Ollama's fields (Open WebUI shows a model as loaded by its `expires_at`)."""
    backend: Backend = request.app.state.backend
    if isinstance(backend, SupportsForward):
        return await _forwarded(backend, request)
    if isinstance(backend, HostPool):
        running = await backend.running()
        if running is not None:  # Ollama hosts: what their own /api/ps says
            return OrjsonResponse({"models": running})
    found = await backend.list_models()
    context = request.app.state.settings.embedded_context if backend.name == "embedded" else None
    expires = (datetime.now(UTC) + _FOREVER).isoformat(timespec="seconds").replace("+00:00", "Z")
    models = []
    for info in found:
        entry = ollama.tag(info)
        del entry["modified_at"]  # not one of /api/ps's fields
        models.append({**entry, "expires_at": expires, "size_vram": 0, "context_length": context})
    return OrjsonResponse({"models": models})


_VERSION = _ok("Ollama's version, or the one whose API MiniVault answers.", {"version": ollama.OLLAMA_API_VERSION})


@router.get("/version", responses={**_VERSION, **_errors(502, 503, 504)})
async def version(request: Request) -> Response:
    """The Ollama version behind MiniVault (with another backend: the Ollama API version MiniVault follows)."""
    backend: Backend = request.app.state.backend
    if isinstance(backend, SupportsForward):
        return await _forwarded(backend, request)
    return OrjsonResponse({"version": ollama.OLLAMA_API_VERSION})


async def _find(backend: Backend, name: str) -> ModelInfo:
    found = await backend.list_models()
    for info in found:
        if info.name == name or info.name == f"{name}:latest":
            return info
    raise ModelNotFound(f"model '{name}' not found (the backend has: {', '.join(m.name for m in found) or 'none'})")


async def _forwarded(backend: SupportsForward, request: Request) -> Response:
    # The path as it arrived, still percent-encoded: a decoded digest may hold bytes no URL can.
    path = request.scope.get("raw_path", b"").decode("latin-1") or request.url.path
    upstream = await backend.forward(request.method, path, await request.body())
    return StreamingResponse(
        upstream.aiter_raw(),
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type"),
        background=BackgroundTask(upstream.aclose),
    )


# Ollama's model management and embeddings: passed to a real Ollama as they are (management: by admin keys,
# whose check reads the bodies that name models: a body it cannot read is a 400 of its own).
_FORWARDED = {
    ("POST", "/pull"): ("Download a model", {"model": "tinyllama:1.1b-chat"}),
    ("POST", "/push"): ("Upload a model to a registry", {"model": "me/mymodel:latest"}),
    ("POST", "/create"): ("Create a model", {"model": "mario", "from": "llama3", "system": "You are Mario."}),
    ("POST", "/copy"): ("Copy a model", {"source": "llama3", "destination": "llama3-backup"}),
    ("DELETE", "/delete"): ("Delete a model", {"model": "llama3-backup"}),
    ("POST", "/embed"): ("Embeddings", {"model": "all-minilm", "input": "Why is the sky blue?"}),
    ("POST", "/embeddings"): ("Embeddings (older route)", {"model": "all-minilm", "prompt": "Why is the sky blue?"}),
}
_AS_IT_CAME = {"description": "Ollama's own answer, as it came", "content": {"*/*": {"schema": {}}}}
_DIGEST = "sha256:29fdb92e57cf0827ded04ae6461b5931d01fa595843f55d36f5b275a52087dd2"
# Their contract is Ollama's (statuses, bodies, content types), passed on unchanged.
PASS_THROUGH_TAG = "Ollama pass-through"


async def forward(request: Request) -> Response:
    """Passed on to Ollama; refused with 501 when the backend is not Ollama."""
    if request.url.path.removeprefix("/api") not in NAMING_PATHS:  # the management check has read those
        reject_non_finite(await request.body())  # read once: Starlette keeps the body for the forward
    return await _forward(request)


@router.head("/blobs/{digest}", summary="Does Ollama have this blob (passed through to Ollama)",
             dependencies=[ModelManagement], responses={"default": _AS_IT_CAME, **_errors(403, 501)},
             tags=[PASS_THROUGH_TAG])  # fmt: skip
async def blob_exists(digest: Annotated[str, Path(examples=[_DIGEST])], request: Request) -> Response:
    """Passed on to Ollama; refused with 501 when the backend is not Ollama."""
    return await _forward(request)


@router.post("/blobs/{digest}", summary="Upload a blob, within MINIVAULT_MAX_BODY_BYTES (passed through to Ollama)",
             dependencies=[ModelManagement], responses={"default": _AS_IT_CAME, **_errors(403, 501)},
             tags=[PASS_THROUGH_TAG])  # fmt: skip
async def blob_upload(digest: Annotated[str, Path(examples=[_DIGEST])], request: Request) -> Response:
    """Passed on to Ollama; refused with 501 when the backend is not Ollama."""
    return await _forward(request)


async def _forward(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    if isinstance(backend, HostPool):
        raise NotSupported(
            f"{request.method} {request.url.path} would act on one of several Ollama hosts (OLLAMA_BASE_URLS); "
            "run it on each host, or pull with POST /models/pull, which pulls on every host"
        )
    if not isinstance(backend, SupportsForward):
        raise NotSupported(
            f"{request.method} {request.url.path} manages Ollama's own models; the {backend.name} backend has none "
            "to manage (use MINIVAULT_BACKEND=ollama)"
        )
    return await _forwarded(backend, request)


for (_method, _path), (_summary, _example) in _FORWARDED.items():
    _extra = None
    if _example is not None:
        _extra = {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}, "example": _example}}}}
    _statuses = (400, 403, 501) if _path in NAMING_PATHS else (403, 501) if _path in MANAGEMENT_PATHS else (501,)
    router.add_api_route(
        _path, forward, methods=[_method], summary=f"{_summary} (passed through to Ollama)", openapi_extra=_extra,
        responses={"default": _AS_IT_CAME, **_errors(*_statuses)}, tags=[PASS_THROUGH_TAG],
        name=f"ollama_{_method.lower()}_{_path.strip('/').split('/')[0]}",
        dependencies=[ModelManagement] if _path in MANAGEMENT_PATHS else None,
    )  # fmt: skip


DIALECT = Dialect("ollama", router.prefix + "/", router, ollama.error_body, ollama.error_line)
