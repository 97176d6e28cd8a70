"""X-Request-ID: taken from the client when it sent a sane one, else generated; echoed on every response."""

import re
import uuid

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serverlog import request_id_var

HEADER = "x-request-id"
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def acceptable_request_id(value: object) -> str | None:
    """The client's id if it is safe to echo and to log, else None."""
    if isinstance(value, str) and _ACCEPTABLE.fullmatch(value):
        return value
    return None


def request_id_of(connection: HTTPConnection) -> str:
    """The id the middleware gave this request or websocket."""
    return connection.scope["state"]["request_id"]


def client_of(connection: HTTPConnection) -> str | None:
    client = connection.client
    return f"{client.host}:{client.port}" if client else None


class RequestIdMiddleware:
    """Pure ASGI, so streamed responses pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = acceptable_request_id(value.decode("latin-1"))
                break
        request_id = request_id or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        # For the server's JSON log lines; each request runs in its own task, so its own context.
        request_id_var.set(request_id)
        raw_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                headers = list(message.get("headers") or ())
                # The error handler for crashes sets the id itself; don't send it twice.
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    headers.append(raw_header)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
