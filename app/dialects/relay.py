"""What the OpenAI- and Ollama-compatible routes share: reading a body into an exchange (refusals
are logged too), and answering it whole or as a stream in the route's own wire format."""

from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar, cast

import orjson
from starlette.requests import Request
from starlette.responses import Response

from app.backends import ChatInput
from app.core.exchange import Exchange
from app.core.service import GenerationService
from app.dialects.inputs import InputLimits
from app.errors import InvalidRequest, MiniVaultError, PayloadTooLarge
from app.schemas import Endpoint
from app.vocabulary import Event
from app.web.auth import caller_of
from app.web.responses import ClientGone, OrjsonResponse, cancel_on_disconnect, open_event_stream

P = TypeVar("P")


async def read_exchange(
    request: Request, endpoint: Endpoint, parse: Callable[[bytes, InputLimits], tuple[P, ChatInput | None]]
) -> tuple[P, Exchange | None]:
    """Parse the body with `parse(body, limits)` into the request and what to ask the backend,
    and open an exchange for it (None when there is nothing to ask: Ollama's "load the model" requests).

    A body that is refused (invalid, too large) is still logged, as on /generate.
    """
    state = request.app.state
    service: GenerationService = state.service
    caller = caller_of(request, endpoint)
    raw = b""
    try:
        raw = await request.body()
        settings = state.settings
        parsed, chat = parse(raw, InputLimits(settings.max_prompt_chars, settings.max_image_bytes))
    except (InvalidRequest, PayloadTooLarge) as exc:
        # Counted against the key's rate limit like a prompt: over it, the answer is the (cheaper) 429.
        raise await service.refuse(caller, exc, *_asked(raw)) from None
    if chat is None:
        return parsed, None
    return parsed, service.chat_exchange(caller, chat)


def _asked(raw: bytes) -> tuple[object, object]:
    """The prompt (or last message) and model a refused body named, as far as it can be read."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    prompt = body.get("prompt")
    messages = body.get("messages")
    if prompt is None and isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        prompt = messages[-1].get("content")
    return prompt, body.get("model")


async def answer(
    request: Request,
    exchange: Exchange,
    *,
    stream: bool,
    whole: Callable[[Exchange], dict[str, Any]],
    token: Callable[[Event], bytes],
    end: Callable[[], bytes],
    on_error: Callable[[MiniVaultError, str], bytes],
    media_type: str,
) -> Response:
    """Generate the answer: as one JSON object `whole(exchange)`, or streamed as `token` frames then `end()`.

    Errors before the first token are ordinary HTTP errors; after it, `on_error` writes the last frame.
    """
    service: GenerationService = request.app.state.service
    if stream:
        # A chat exchange never yields queue markers, only the answer's events.
        chunks = cast(AsyncGenerator[Event, None], service.stream(exchange))
        response = await open_event_stream(
            request.receive, chunks, token, exchange.id, last=end, on_error=on_error, media_type=media_type
        )
        return _with_ignored_options(response, exchange)  # known by now: the first event has been awaited
    try:
        await cancel_on_disconnect(request.receive, service.run(exchange))
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; the exchange is logged as cancelled
    return _with_ignored_options(OrjsonResponse(whole(exchange)), exchange)


IGNORED_OPTIONS_HEADER = "X-MiniVault-Ignored-Options"


def _with_ignored_options(response: Response, exchange: Exchange) -> Response:
    ignored = exchange.completion.ignored_options
    if ignored:
        response.headers[IGNORED_OPTIONS_HEADER] = ", ".join(ignored)
    return response
