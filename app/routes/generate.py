"""POST /generate: the whole answer as JSON, or Server-Sent Events when `stream` is true.

A prompt may ask for a `format`, send `images` and ask for thinking (`think`); the thinking streams as
`thinking` events before and beside the `token` ones, and the answer carries it whole as `thinking`.
Tools stay in the chat dialects (/api/chat, /v1/chat/completions).
"""

from dataclasses import replace
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.config import Settings
from app.core.service import GenerationService, Queued
from app.errors import InvalidRequest, PayloadTooLarge
from app.schemas import ErrorBody, GenerateResponse, parse_generate_request
from app.vocabulary import Event, ThinkingDelta
from app.web.auth import caller_of
from app.web.responses import ClientGone, OrjsonResponse, cancel_on_disconnect, open_event_stream, sse_doc, sse_event

router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        401: "unauthorized: no API key, or an unknown one (when MINIVAULT_API_KEYS is set)",
        404: "model_not_found: the upstream lacks the model",
        413: "payload_too_large: the body is over MINIVAULT_MAX_BODY_BYTES",
        422: "invalid_request: the body is not a valid request",
        502: "backend_error: the upstream failed",
        503: "backend_unavailable: the upstream cannot be reached; shutting_down: MiniVault is stopping; "
        "model_loading: the default model is being pulled (MINIVAULT_AUTO_PULL)",
        504: "backend_timeout: the upstream did not answer in time (the message names the timeout setting)",
    }.items()
}
ERRORS[429] = {
    "model": ErrorBody,
    "description": "busy: MiniVault's queue (MINIVAULT_MAX_QUEUE) or Ollama's is full; queue_share_exceeded: the "
    "API key holds its share of the queue (MINIVAULT_MAX_QUEUE_PER_KEY); rate_limited: the API key "
    "sent more than MINIVAULT_RATE_LIMIT prompts (refused ones included) in the last minute",
    "headers": {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}},
}
_SSE_DOC = sse_doc(
    "With `stream: true`: `queued` (while waiting for a slot), `thinking` (pieces of the model's thinking, "
    "with `think`) and `token` events, then `done` or `error`.",
    {
        "queued": {"type": "object", "required": ["position"], "properties": {"position": {"type": "integer"}}},
        "thinking": {"type": "object", "required": ["content"], "properties": {"content": {"type": "string"}}},
        "token": {"type": "object", "required": ["content"], "properties": {"content": {"type": "string"}}},
        "done": {"$ref": "#/components/schemas/GenerateResponse"},
        "error": {"$ref": "#/components/schemas/ErrorBody"},
    },
)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**ERRORS, 200: {"content": _SSE_DOC["content"]}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}},
        }
    },
)
async def generate(request: Request) -> Response:
    """Generate an answer for a prompt; `stream: true` answers as Server-Sent Events."""
    # The lifespan's objects are read from app.state directly: this is the hot path, and
    # resolving dependencies costs more here than the rest of the route's own work.
    state = request.app.state
    settings: Settings = state.settings
    service: GenerationService = state.service
    caller = caller_of(request, "rest")
    body = b""
    try:
        body = await request.body()
        generate_request = parse_generate_request(body, settings.max_prompt_chars, settings.max_image_bytes)
    except (InvalidRequest, PayloadTooLarge) as exc:
        # Counted against the key's rate limit like a prompt: over it, the answer is the (cheaper) 429.
        raise await service.refuse(caller, exc, prompt=_prompt_of(body)) from None
    if generate_request.stream:
        caller = replace(caller, endpoint="sse")
    exchange = service.exchange(caller, generate_request)
    if generate_request.stream:
        return await open_event_stream(
            request.receive,
            service.stream(exchange),
            _event,
            caller.request_id,
            last=lambda: sse_event(b"done", exchange.result()),
        )
    try:
        return OrjsonResponse(await cancel_on_disconnect(request.receive, service.run(exchange)))
    except ClientGone:
        # Nobody is listening; the exchange is already logged as cancelled.
        return Response(status_code=499)


def _event(item: Event | Queued) -> bytes:
    if type(item) is str:
        return sse_event(b"token", {"content": item})
    if type(item) is ThinkingDelta:
        return sse_event(b"thinking", {"content": item.text})
    if type(item) is Queued:
        return sse_event(b"queued", {"position": item.position})
    return b""  # tool calls stay in the chat dialects: /generate offers no tools, so none are made


def _prompt_of(body: bytes) -> object:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed.get("prompt") if isinstance(parsed, dict) else None
