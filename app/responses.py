"""Response helpers: orjson bodies, and racing a coroutine against the client hanging up."""

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
import orjson
from starlette.responses import JSONResponse
from starlette.types import Receive

T = TypeVar("T")


class OrjsonResponse(JSONResponse):
    """JSON via orjson: UTF-8 as is, several times faster than the stdlib encoder."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


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


async def first_item(items: AsyncIterator[T]) -> T | None:
    """The first item (None when there is none), closing the iterator if getting it fails.

    Streams wait for their first item before sending a 200, so a failure that happens
    before anything was produced is still an ordinary HTTP error with the right status.
    """
    try:
        return await anext(items, None)
    except BaseException:
        await items.aclose()  # type: ignore[attr-defined]
        raise
