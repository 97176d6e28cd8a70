"""POST /generate: the whole answer as JSON, or Server-Sent Events when `stream` is true."""

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.backends import Backend
from app.config import Settings
from app.core import Exchange, log_rejected, run_generation, stream_generation
from app.errors import InvalidRequest
from app.interactions import JsonlWriter
from app.request_id import client_of, request_id_of
from app.responses import ClientGone, OrjsonResponse, cancel_on_disconnect, open_event_stream, sse_event
from app.schemas import ErrorBody, GenerateRequest, GenerateResponse, parse_generate_request

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        404: "model_not_found: the upstream lacks the model",
        422: "invalid_request: the body is not a valid request",
        502: "backend_error: the upstream failed",
        503: "backend_unavailable: the upstream cannot be reached",
        504: "backend_timeout: the upstream did not answer in time",
    }.items()
}
_SSE_DOC = {
    "description": "With `stream: true`: `token`, then `done` or `error` events.",
    "content": {"text/event-stream": {}},
}


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": _SSE_DOC}}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
                }
            },
        }
    },
)
async def generate(request: Request) -> Response:
    """Generate an answer for a prompt; `stream: true` answers as Server-Sent Events."""
    # The lifespan's objects are read from app.state directly: this is the hot path, and
    # resolving dependencies costs more here than the rest of the route's own work.
    state = request.app.state
    settings: Settings = state.settings
    backend: Backend = state.backend
    log: JsonlWriter = state.interaction_log
    request_id = request_id_of(request)
    client = client_of(request)
    body = await request.body()
    try:
        generate_request = parse_generate_request(body, settings.max_prompt_chars)
    except InvalidRequest as exc:
        log_rejected(log, backend, request_id, "rest", client, exc, prompt=_prompt_of(body))
        raise
    exchange = Exchange(request_id, "sse" if generate_request.stream else "rest", client, generate_request, backend)
    if generate_request.stream:
        chunks = stream_generation(exchange, backend, log)
        return await open_event_stream(
            request.receive, chunks, _token, request_id, last=lambda: sse_event(b"done", exchange.result())
        )
    try:
        return OrjsonResponse(await cancel_on_disconnect(request.receive, run_generation(exchange, backend, log)))
    except ClientGone:
        # Nobody is listening; the exchange is already logged as cancelled.
        return Response(status_code=499)


def _token(text: str) -> bytes:
    return sse_event(b"token", {"content": text})


def _prompt_of(body: bytes) -> object:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed.get("prompt") if isinstance(parsed, dict) else None
