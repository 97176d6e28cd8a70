"""WS /ws/generate: prompts in, `start` / `token` / `done` | `error` frames out, one connection for many prompts.

A prompt frame takes what `POST /generate` takes (`format`, `images`, `think` included); with `think` the
model's thinking streams as `thinking` frames, and the `done` frame carries it whole.
"""

import asyncio
import logging
import time
from collections import deque
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import anyio
import orjson
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from app.core.exchange import Exchange
from app.core.service import GenerationService, Queued
from app.errors import InvalidRequest, MiniVaultError, PayloadTooLarge, TooManyInvalidFrames
from app.schemas import parse_generate_request
from app.vocabulary import ThinkingDelta
from app.web.auth import caller_of
from app.web.request_id import acceptable_request_id, new_request_id
from app.web.responses import ws_error_frame

router = APIRouter()
logger = logging.getLogger(__name__)

# OpenAPI cannot describe a websocket, so the API's description carries this worked example.
WS_DOC = """
### WS /ws/generate

One connection, many prompts, one at a time. Send a prompt frame, receive `start`, `queued` (while
waiting for a slot), `thinking` (with `think`) and `token` frames, then `done` (the same body as
`POST /generate`) or `error`.
Send `{"type": "cancel"}` to stop the answer. With API keys, pass `?api_key=KEY` (browsers cannot
set websocket headers) or either header.

```
> {"prompt": "Why is the sky blue?", "model": "tinyllama:1.1b-chat", "options": {"temperature": 0.2}}
< {"type": "start", "id": "5f0c3f7e2b9d4c3e8a1b2c3d4e5f6a7b", "model": "tinyllama:1.1b-chat"}
< {"type": "token", "content": "Sunlight"}
< {"type": "token", "content": " scatters"}
< {"type": "done", "response": "Sunlight scatters ...", "id": "5f0c...", "done_reason": "stop", ...}
> {"prompt": "Is 97 prime?", "model": "qwen3:0.6b", "think": true}
< {"type": "start", "id": "0b6e...", "model": "qwen3:0.6b"}
< {"type": "thinking", "content": "97 is not divisible by 2, 3, 5 or 7"}
< {"type": "token", "content": "Yes"}
< {"type": "done", "response": "Yes, 97 is prime.", "thinking": "97 is not divisible by 2, 3, 5 or 7 ...", ...}
```

The OpenAI-compatible API is under `/v1`, the Ollama-compatible one under `/api`; the chat page is at `/`.
"""

# MINIVAULT_WS_MAX_INVALID_FRAMES counts the invalid frames within this many seconds.
INVALID_WINDOW = 10.0
_BUSY = 'a generation is already running on this connection: wait for its "done" frame or send {"type": "cancel"}'


class _Session:
    """One websocket: reads frames while at most one generation streams back."""

    def __init__(self, websocket: WebSocket) -> None:
        state = websocket.app.state
        self.websocket = websocket
        self.service: GenerationService = state.service
        self.max_prompt_chars: int = state.settings.max_prompt_chars
        self.max_image_bytes: int = state.settings.max_image_bytes
        self.max_bytes: int = state.settings.max_body_bytes
        # Who is asking, for every prompt on this connection; each prompt gets its own request id.
        self.caller = caller_of(websocket, "ws")
        self.task: asyncio.Task[None] | None = None
        self.scope: anyio.CancelScope | None = None
        self.max_invalid: int = state.settings.ws_max_invalid_frames
        # When the latest invalid frames came (time.monotonic()): one more than the limit within the window closes.
        self.invalid: deque[float] = deque(maxlen=self.max_invalid + 1)
        self.closed = False

    async def send(self, frame: dict[str, Any]) -> None:
        if self.websocket.application_state is WebSocketState.CONNECTED:
            await self.websocket.send_text(orjson.dumps(frame).decode())

    async def serve(self) -> None:
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                raw = message.get("text") or message.get("bytes") or b""
                # The limit is in bytes; a text frame's UTF-8 is at most 4 bytes a character, so most need no encoding.
                size = len(raw) if isinstance(raw, bytes) or len(raw) * 4 <= self.max_bytes else len(raw.encode())
                if size > self.max_bytes:
                    await self.refuse_oversized(size)
                    return
                await self.handle(raw)
                if self.closed:
                    return
        finally:
            if self.task is not None and not self.task.done():
                # The client left: stop the upstream at once; the exchange logs itself as cancelled.
                self.task.cancel()
                await asyncio.gather(self.task, return_exceptions=True)

    async def handle(self, raw: str | bytes) -> None:
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            await self.reject(
                new_request_id(), InvalidRequest(f'the frame is not valid JSON ({exc}): send {{"prompt": "Hello"}}')
            )
            return
        if not isinstance(payload, dict):
            await self.reject(
                new_request_id(), InvalidRequest('each frame must be a JSON object like {"prompt": "Hello"}')
            )
            return
        kind = payload.pop("type", "generate")
        request_id = acceptable_request_id(payload.pop("id", None)) or new_request_id()
        if kind == "cancel":
            if self.scope is not None:
                self.scope.cancel()
            return
        if kind != "generate":
            shown = orjson.dumps(kind).decode()[:100]  # the type is the client's: its echo (and log) stays short
            await self.reject(
                request_id, InvalidRequest(f'type: unknown frame type {shown}; use "generate" or "cancel"'), payload
            )
            return
        if self.task is not None and not self.task.done():
            await self.reject(request_id, InvalidRequest(_BUSY), payload)
            return
        try:
            request = parse_generate_request(payload, self.max_prompt_chars, self.max_image_bytes)
        except InvalidRequest as exc:
            await self.reject(request_id, exc, payload)
            return
        exchange = self.service.exchange(replace(self.caller, request_id=request_id), request)
        self.scope = anyio.CancelScope()
        self.task = asyncio.create_task(self.generate(exchange, self.scope))

    async def generate(self, exchange: Exchange, scope: anyio.CancelScope) -> None:
        try:
            await self.send({"type": "start", "id": exchange.id, "model": exchange.model})
            with scope:
                async with aclosing(self.service.stream(exchange)) as items:
                    async for item in items:
                        if type(item) is str:
                            await self.send({"type": "token", "content": item})
                        elif type(item) is ThinkingDelta:
                            await self.send({"type": "thinking", "content": item.text})
                        elif type(item) is Queued:
                            await self.send({"type": "queued", "position": item.position})
            await self.send({"type": "done", **exchange.result()})
        except MiniVaultError as exc:
            await self.send_error(exc, exchange.id)
        except (WebSocketDisconnect, OSError):
            logger.debug("websocket %s left during %s", self.caller.client, exchange.id)

    async def send_error(self, error: MiniVaultError, request_id: str) -> None:
        """The error frame; an error that ends the connection (shutdown, too big) closes it with its code."""
        if self.websocket.application_state is not WebSocketState.CONNECTED:
            return
        await self.websocket.send_text(ws_error_frame(error, request_id))
        if error.ws_close is not None:
            await self.websocket.close(error.ws_close, error.code)

    async def refuse_oversized(self, size: int) -> None:
        error = PayloadTooLarge(
            f"the message is {size} bytes; the limit is {self.max_bytes} (MINIVAULT_MAX_BODY_BYTES)"
        )
        request_id = new_request_id()
        answer = await self.service.refuse(replace(self.caller, request_id=request_id), error)
        await self.send_error(answer, request_id)
        if answer is not error:  # over the rate limit: the socket closes all the same, as too big a message does
            await self.close(error)

    async def reject(self, request_id: str, error: InvalidRequest, payload: dict[str, Any] | None = None) -> None:
        """Refuse one invalid frame; past MINIVAULT_WS_MAX_INVALID_FRAMES within INVALID_WINDOW, close the socket."""
        prompt = (payload or {}).get("prompt")
        now = time.monotonic()
        invalid = self.invalid
        invalid.append(now)
        if len(invalid) > self.max_invalid and now - invalid[0] < INVALID_WINDOW:
            # One record and one line for the close, however fast the frames came: a flood of them once
            # wrote 200,000 log lines in 10 s and slowed every other client.
            closing = TooManyInvalidFrames(
                f"more than {self.max_invalid} invalid frames within {INVALID_WINDOW:g} s "
                f"(MINIVAULT_WS_MAX_INVALID_FRAMES={self.max_invalid}); closing the connection: fix the frames "
                f"and reconnect"
            )
            logger.warning(
                "websocket from %s closed (1008): more than %d invalid frames within %g s, the last: %s",
                self.caller.client, self.max_invalid, INVALID_WINDOW, error.message[:200],
            )  # fmt: skip
            self.service.reject(replace(self.caller, request_id=request_id), closing, prompt=prompt)
            await self.close(closing, request_id)
            return
        answer = await self.service.refuse(replace(self.caller, request_id=request_id), error, prompt=prompt)
        await self.send_error(answer, request_id)

    async def close(self, error: MiniVaultError, request_id: str | None = None) -> None:
        """End the connection: the error frame (unless sent already) and the close code `error` names."""
        self.closed = True
        if self.websocket.application_state is not WebSocketState.CONNECTED:
            return
        if request_id is not None:
            await self.websocket.send_text(ws_error_frame(error, request_id))
        await self.websocket.close(error.ws_close or 1008, error.code)


@router.websocket("/ws/generate")
async def ws_generate(websocket: WebSocket) -> None:
    """Stream answers over a websocket; see the README for the frame protocol."""
    await websocket.accept()
    await _Session(websocket).serve()
