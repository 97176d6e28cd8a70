"""MINIVAULT_MAX_BODY_BYTES for HTTP bodies, declared or chunked: 413 `payload_too_large`.

Pure ASGI: it wraps `receive`, so a declared Content-Length over the limit fails on the first
read without reading the body, and a chunked body fails as soon as it passes the limit. The
error is raised inside the route, so the app's error handler renders it (and /generate logs it).
Websocket messages are checked by the websocket route (close code 1009).
"""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = int(value) if value.isdigit() else None
                break
        if declared is not None and declared <= limit:
            # The server delivers no more than Content-Length: nothing to count.
            await self.app(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared is not None:
                raise _too_large(limit, f"Content-Length says {declared} bytes")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit, f"more than {limit} bytes arrived")
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int, what: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"the body is too large ({what}); the limit is {limit} bytes (MINIVAULT_MAX_BODY_BYTES)")
