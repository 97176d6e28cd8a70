"""The app factory: `uvicorn app.main:app` serves the app built from the environment."""

import asyncio
import gc
import ipaddress
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Route, compile_path

from app import __version__
from app.admission.opening import open_limits
from app.backends import Backend, open_backend
from app.backends.probe import BackendProbe
from app.config import ConfigError, Settings, load_settings
from app.core.autopull import start_bootstrap
from app.core.conversations import ContextLimits, ConversationMemory
from app.core.drain import install_drain
from app.core.service import GenerationService, Timeouts
from app.dialects.ollama import routes as ollama_api
from app.dialects.ollama.wire import ChatBody, GenerateBody
from app.dialects.openai import routes as openai_api
from app.dialects.openai.wire import ChatCompletionRequest, CompletionRequest
from app.errors import InvalidRequest, MethodNotAllowed, MiniVaultError, RouteNotFound
from app.exchanges import JsonlWriter
from app.exchanges.metrics import Metrics
from app.routes import conversations, generate, health, history, metrics, models, ws
from app.routes.conversations import NewConversation
from app.routes.pages import mount_pages
from app.schemas import GenerateRequest, PullRequest, describe_validation_errors
from app.serverlog import configure_server_log
from app.store.opening import open_stores
from app.web.auth import OPEN_PATHS, ApiKeyMiddleware
from app.web.body_limit import BodyLimitMiddleware
from app.web.connections import check_connection_guards
from app.web.edge import WebGuardMiddleware
from app.web.errors import register_dialect
from app.web.request_id import RequestIdMiddleware, request_id_of
from app.web.responses import error_response

logger = logging.getLogger("app")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build MiniVault; the lifespan opens the upstream client, the generation service and the log."""
    settings = settings or load_settings()
    configure_server_log(settings.log_format)
    app_metrics = Metrics(settings.metrics_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_server_log(settings.log_format)  # uvicorn may have reconfigured logging since
        check_connection_guards(settings)  # before the drain takes over uvicorn's signal handler
        async with AsyncExitStack() as stack:
            stack.callback(app_metrics.close)
            interaction_log = JsonlWriter(
                settings.log_path,
                on_batch=app_metrics.count_log_batch,
                max_bytes=settings.log_max_bytes,
                backups=settings.log_backups,
                max_queue_bytes=settings.writer_queue_bytes,
                on_summarized=app_metrics.summarized("log"),
            )
            interaction_log.start()
            stack.push_async_callback(interaction_log.aclose)
            # SQLite files by default; PostgreSQL, shared by replicas, with MINIVAULT_DATABASE_URL.
            exchange_history, conversations = await open_stores(settings, stack)
            # The log comes first (a full disk): the history writes only what the log has.
            exchange_history.follow(interaction_log)
            exchange_history.bound_queue(settings.writer_queue_bytes, app_metrics.summarized("history"))
            backend = await open_backend(settings, stack, app_metrics)
            memory = None
            if conversations is not None:
                memory = ConversationMemory(
                    conversations, ContextLimits(settings.max_turns, settings.max_context_chars)
                )
                stack.push_async_callback(memory.aclose)  # shared locks given back before the store closes
            # With MINIVAULT_REDIS_URL the limits are the fleet's; opened before the service, closed after its drain.
            admission, rate_limiter = await open_limits(settings, stack, app_metrics.set_load)
            service = GenerationService(
                backend,
                admission,
                Timeouts(settings.first_token_timeout, settings.idle_timeout, settings.total_timeout),
                [interaction_log, app_metrics, exchange_history],
                keep_text=settings.log_prompts,
                memory=memory,
                rate_limiter=rate_limiter,
            )
            app.state.service = service
            app.state.backend = backend
            app.state.interaction_log = interaction_log
            app.state.history = exchange_history
            app.state.probe = BackendProbe(backend, settings.health_timeout, settings.health_cache_seconds)
            app.state.loading = None
            # With MINIVAULT_AUTO_PULL (Ollama), a missing default model is pulled first, then warmed up.
            app.state.bootstrap = start_bootstrap(settings, backend, service, app.state.probe.forget,
                                                  partial(_warm_up, backend) if settings.warmup else None)  # fmt: skip
            if app.state.bootstrap is not None:
                stack.push_async_callback(app.state.bootstrap.aclose)
            elif settings.warmup:
                app.state.loading = asyncio.create_task(_warm_up(backend))
                stack.callback(app.state.loading.cancel)
            stack.callback(install_drain(service, settings.shutdown_grace))
            _announce_access(settings)
            # Everything built so far lives as long as the process: move it out of the garbage
            # collector's sight, so collections during requests scan only what requests create
            # (bench/: about 10% less CPU per request and a shorter p99).
            gc.collect()
            gc.freeze()
            yield

    app = FastAPI(
        title="MiniVault",
        version=__version__,
        summary="A local REST, SSE and WebSocket gateway in front of a local LLM.",
        description=ws.WS_DOC,
        lifespan=lifespan,
        docs_url=None,  # served by app.routes.pages, from local files
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = app_metrics
    # Added innermost first: request id, then the web guard (foreign Host, Origin, non-JSON bodies: before
    # anything else sees them), then CORS (preflights answered without a key), then auth, then the body
    # limit; each error on the way out carries the request id.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if digests := settings.key_digests():
        app.add_middleware(
            ApiKeyMiddleware, digests=digests, on_refused=app_metrics.count_refused,
            admin_digests=settings.admin_key_digests(),
        )  # fmt: skip
    if origins := settings.cors_origin_list():
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
            expose_headers=["X-Request-ID", "Retry-After"], max_age=600,
        )  # fmt: skip
    app.add_middleware(
        WebGuardMiddleware, allowed_hosts=settings.allowed_host_list(), allowed_origins=settings.cors_origin_list(),
        on_refused=app_metrics.count_refused,
    )  # fmt: skip
    app.add_middleware(RequestIdMiddleware)
    _add_error_handlers(app)
    # Starlette tries routers in this order, and each one tried before the right one costs a few µs
    # per request (bench/: the dialects cost 1.17-1.28x /generate's CPU when they came last): the
    # prompt routes come first.
    app.include_router(generate.router)
    register_dialect(app, openai_api.DIALECT)
    register_dialect(app, ollama_api.DIALECT)
    app.include_router(ws.router)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(metrics.router)
    app.include_router(conversations.router)
    app.include_router(history.router)
    mount_pages(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    methods: set[str] = set()
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, Route) and context.path and compile_path(context.path)[0].match(path):
            methods |= route.methods or set()
    return sorted(methods)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus what its decorators cannot say: the hand-parsed request bodies, the
    API key schemes, and the 401 that every route but /health and /ready can answer."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, description=app.description, routes=app.routes
    )
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    for model in (
        GenerateRequest, PullRequest, NewConversation, ChatCompletionRequest, CompletionRequest, GenerateBody, ChatBody,
    ):  # fmt: skip
        model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        models.update(model_schema.pop("$defs", {}))
        models[model.__name__] = model_schema
    _document_edge_errors(schema)
    if not app.state.settings.key_digests():
        # Declared only when enforced: schemathesis' ignored_auth check (rightly) fails a scheme the API ignores.
        app.openapi_schema = schema
        return schema
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "A key from MINIVAULT_API_KEYS."},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The same key."},
    }
    unauthorized = {
        "description": "unauthorized: no API key, or an unknown one (only when MINIVAULT_API_KEYS is set)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }
    for path, operations in schema["paths"].items():
        if path in OPEN_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
            operation["responses"].setdefault("401", unauthorized)
    app.openapi_schema = schema
    return schema


# The web guard's refusals (app/web/edge.py), in the body shape of each path's dialect.
_FOREIGN = "host_not_allowed or origin_not_allowed: a foreign Host (see MINIVAULT_ALLOWED_HOSTS) or a web page of "\
    "another origin (see MINIVAULT_CORS_ORIGINS)"  # fmt: skip
_NOT_JSON = "unsupported_media_type: the body is not sent as `Content-Type: application/json` (or a `+json` type)"
_FORM_BLOB = "unsupported_media_type: a blob sent as text/plain or form data (send application/octet-stream)"


def _document_edge_errors(schema: dict[str, Any]) -> None:
    """Add the 403 every operation can answer and the 415 of every operation that takes a body."""
    for path, operations in schema["paths"].items():
        if path.startswith("/v1/"):
            body = "OpenAIErrorBody"
        elif path.startswith("/api/"):
            body = "OllamaErrorBody"
        else:
            body = "ErrorBody"
        content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}
        for method, operation in operations.items():
            responses = operation["responses"]
            if "403" in responses:
                responses["403"]["description"] += f"; or {_FOREIGN}"
            else:
                responses["403"] = {"description": _FOREIGN, "content": content}
            if method == "post" and path.startswith("/api/blobs/"):
                responses.setdefault("415", {"description": _FORM_BLOB, "content": content})
            elif "requestBody" in operation:
                responses.setdefault("415", {"description": _NOT_JSON, "content": content})


async def _warm_up(backend: Backend) -> None:
    """Have the upstream load the default model; /ready says `loading` until this ends."""
    model = backend.default_model
    logger.info("warm-up: loading %s on %s", model, backend.name)
    try:
        await backend.warm(model)
    except MiniVaultError as exc:
        logger.warning("warm-up of %s failed: %s", model, exc.message)
        return
    logger.info("warm-up: %s is loaded", model)


def _announce_access(settings: Settings) -> None:
    keys = settings.key_digests()
    if keys:
        logger.info("auth is on: %d API key(s); /health and /ready stay open", len(keys))
        return
    logger.info("auth is off: anyone who can reach this port can use the model (set MINIVAULT_API_KEYS)")
    host = _bound_host()
    if host is not None and not _is_loopback(host):
        logger.warning(
            "listening on %s with no API keys: anyone on the network can use the model and read the log; "
            "set MINIVAULT_API_KEYS, or bind to 127.0.0.1",
            host,
        )


def _bound_host() -> str | None:
    """The --host uvicorn (or `minivault serve`) was started with, if any."""
    args = sys.argv[1:]
    for index, arg in enumerate(args):
        if arg == "--host" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return os.environ.get("UVICORN_HOST")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MiniVaultError)
    async def on_minivault_error(request: Request, exc: MiniVaultError) -> Response:
        return error_response(exc, request_id_of(request), scope=request.scope)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        error = InvalidRequest(describe_validation_errors(exc))  # type: ignore[arg-type]
        return error_response(error, request_id_of(request), scope=request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            error: MiniVaultError = RouteNotFound(
                f"no route {request.method} {request.url.path}; the API is listed at /docs"
            )
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.url.path} does not take {request.method}; the API is listed at /docs")
            # Starlette's Allow names the methods of the first route on the path; a path served by
            # several routes (GET and POST /conversations) takes all of theirs.
            allowed = _allowed_methods(app, request.url.path)
            return error_response(error, request_id_of(request), {"Allow": ", ".join(allowed)}, request.scope)
        else:
            error = MiniVaultError(str(exc.detail))
            error.status = exc.status_code  # type: ignore[misc]
        return error_response(error, request_id_of(request), exc.headers, request.scope)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> Response:
        # Runs outside the request-id middleware, so the renderer sets the header itself.
        request_id = request.scope.get("state", {}).get("request_id", "unknown")
        logger.exception("unhandled error in %s %s (%s)", request.method, request.url.path, request_id)
        error = MiniVaultError("MiniVault hit an internal error; the server log has the details")
        return error_response(error, request_id, scope=request.scope)


try:
    app = create_app()
except ConfigError as exc:
    raise SystemExit(f"minivault: {exc}") from None
