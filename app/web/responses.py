"""Response helpers: orjson bodies, Server-Sent Event streams, and racing work against the client hanging up."""

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
import orjson
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from app.errors import MiniVaultError, error_body
from app.web.errors import minivault_error, shapes_of
from app.web.request_id import HEADER

T = TypeVar("T")


class OrjsonResponse(JSONResponse):
    """JSON via orjson: UTF-8 as is, several times faster than the stdlib encoder."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(
    error: MiniVaultError, request_id: str, headers: Mapping[str, str] | None = None, scope: Scope | None = None
) -> OrjsonResponse:
    """The one HTTP rendering of an error: its status, its body in the shape of the route's dialect, its headers.

    MiniVault's own routes answer `{"error": {"code", "message", "id"}}`; a registered dialect's routes
    (and paths under its prefix) answer its shape (app/web/errors.py).
    """
    merged = {**(error.headers or {}), **(headers or {}), HEADER: request_id}
    render = shapes_of(scope["app"]).renderer(scope) if scope is not None and "app" in scope else minivault_error
    status, body = render(error, request_id)
    return OrjsonResponse(body, status_code=status, headers=merged)


def ws_error_frame(error: MiniVaultError, request_id: str) -> str:
    """The websocket rendering: `{"type": "error", "code", "message", "id"}`."""
    return orjson.dumps({"type": "error", **error.to_dict(request_id)}).decode()


async def send_ws_error(receive: Receive, send: Send, error: MiniVaultError, request_id: str) -> None:
    """Refuse a websocket before the app sees it: accept, send the error frame, close with its code."""
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": ws_error_frame(error, request_id)})
    await send({"type": "websocket.close", "code": error.ws_close or 1011, "reason": error.code})


def sse_event(name: bytes, payload: Any) -> bytes:
    """One Server-Sent Event; orjson never emits a raw newline, so `data` is always one line."""
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def sse_doc(description: str, events: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """OpenAPI for a Server-Sent Events response: `schema` describes one event (OpenAPI 3.1; 3.2 names it
    `itemSchema`), whose `data` is JSON with a schema per event name. Schemathesis validates every event."""
    one_of = [
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"const": name},
                "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": schema},
            },
        }
        for name, schema in events.items()
    ]
    return {"description": description, "content": {"text/event-stream": {"schema": {"oneOf": one_of}}}}


class EventStreamResponse(StreamingResponse):
    """Server-Sent Events (or NDJSON lines) from an async iterator of encoded bytes.

    Encoding happens where the events are made, with no per-event objects, and the client's
    departure is always watched for: uvicorn silently drops what is sent to a client that has
    gone, so without watching `receive()` a stream would run on (and keep the model busy).
    """

    def __init__(self, events: AsyncIterator[bytes], media_type: str = "text/event-stream") -> None:
        # no-cache and X-Accel-Buffering stop proxies (nginx) from holding events back.
        super().__init__(
            events, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await cancel_on_disconnect(receive, self.stream_response(send))
        except ClientGone:
            pass  # the events iterator was cancelled, which closed the upstream request


def sse_error_event(error: MiniVaultError, request_id: str) -> bytes:
    """How MiniVault's own streams end on a failure: an `error` event with the REST error body."""
    return sse_event(b"error", error_body(error, request_id))


async def open_event_stream(
    receive: Receive,
    items: AsyncGenerator[T, None],
    encode: Callable[[T], bytes],
    request_id: str,
    last: Callable[[], bytes] | None = None,
    on_error: Callable[[MiniVaultError, str], bytes] = sse_error_event,
    media_type: str = "text/event-stream",
) -> Response:
    """Relay `items` as a stream (Server-Sent Events unless `media_type` says otherwise), ending with
    `last()` or `on_error(error, request_id)`.

    The first item is awaited before answering, so a failure before anything was produced
    is still an ordinary HTTP error with the right status; a client that leaves meanwhile
    gets nothing (499), and the items are closed.
    """
    try:
        first = await cancel_on_disconnect(receive, first_item(items))
    except ClientGone:
        return Response(status_code=499)
    return EventStreamResponse(_relay(first, items, encode, request_id, last, on_error), media_type)


async def _relay(
    first: T | None,
    items: AsyncGenerator[T, None],
    encode: Callable[[T], bytes],
    request_id: str,
    last: Callable[[], bytes] | None,
    on_error: Callable[[MiniVaultError, str], bytes],
) -> AsyncIterator[bytes]:
    async with aclosing(items):
        try:
            if first is not None:
                yield encode(first)
                async for item in items:
                    yield encode(item)
        except MiniVaultError as exc:
            yield on_error(exc, request_id)
            return
    if last is not None:
        yield last()


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def cancel_on_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it the moment the client disconnects (then raise ClientGone).

    Starlette keeps running a handler whose client left; for an LLM call that means the
    upstream keeps generating for nobody, so we watch `receive()` ourselves.
    """
    with anyio.CancelScope() as scope:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            scope.cancel()

        watcher = asyncio.create_task(watch())
        try:
            return await work
        finally:
            watcher.cancel()
    raise ClientGone


async def first_item(items: AsyncGenerator[T, None]) -> T | None:
    """The first item (None when there is none), closing the generator if getting it fails."""
    try:
        return await anext(items, None)
    except BaseException:
        await items.aclose()
        raise
