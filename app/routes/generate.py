"""POST /generate: the whole answer as JSON, or Server-Sent Events when `stream` is true."""

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import orjson
from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse
from starlette.responses import Response

from app.core import Exchange, log_rejected, run_generation, stream_generation
from app.deps import BackendDep, LogDep, SettingsDep
from app.errors import InvalidRequest, MiniVaultError, error_body
from app.request_id import client_of, request_id_of
from app.responses import ClientGone, OrjsonResponse, cancel_on_disconnect, first_item
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
async def generate(request: Request, settings: SettingsDep, backend: BackendDep, log: LogDep) -> Response:
    """Generate an answer for a prompt; `stream: true` answers as Server-Sent Events."""
    request_id = request_id_of(request)
    client = client_of(request)
    body = await request.body()
    try:
        generate_request = parse_generate_request(body, settings.max_prompt_chars)
    except InvalidRequest as exc:
        log_rejected(log, backend, request_id, "rest", client, exc, prompt=_prompt_of(body))
        raise
    exchange = Exchange(request_id, "sse" if generate_request.stream else "rest", client, generate_request, backend)
    try:
        if generate_request.stream:
            return await cancel_on_disconnect(request.receive, _open_event_stream(exchange, backend, log))
        return OrjsonResponse(await cancel_on_disconnect(request.receive, run_generation(exchange, backend, log)))
    except ClientGone:
        # Nobody is listening; the exchange is already logged as cancelled.
        return Response(status_code=499)


async def _open_event_stream(exchange: Exchange, backend: BackendDep, log: LogDep) -> EventSourceResponse:
    chunks = stream_generation(exchange, backend, log)
    first = await first_item(chunks)
    return EventSourceResponse(_events(first, chunks, exchange), headers={"Cache-Control": "no-cache"}, ping=15)


async def _events(first: str | None, chunks: AsyncIterator[str], exchange: Exchange) -> AsyncIterator[dict[str, str]]:
    async with aclosing(chunks):
        try:
            if first is not None:
                yield {"event": "token", "data": _token_json(first)}
                async for text in chunks:
                    yield {"event": "token", "data": _token_json(text)}
        except MiniVaultError as exc:
            yield {"event": "error", "data": orjson.dumps(error_body(exc, exchange.id)).decode()}
            return
    yield {"event": "done", "data": orjson.dumps(exchange.result()).decode()}


def _token_json(text: str) -> str:
    return orjson.dumps({"content": text}).decode()


def _prompt_of(body: bytes) -> object:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed.get("prompt") if isinstance(parsed, dict) else None
