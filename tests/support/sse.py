"""A minimal Server-Sent Events reader over httpx's streaming response, for the tests."""

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson


class _Parser:
    """Feed lines; get (event, parsed data) back when a blank line ends an event."""

    def __init__(self) -> None:
        self.event, self.data = "message", []  # type: tuple[str, list[str]]

    def feed(self, line: str) -> tuple[str, Any] | None:
        if line == "":
            done = (self.event, orjson.loads("\n".join(self.data))) if self.data else None
            self.event, self.data = "message", []
            return done
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].removeprefix(" "))
        return None  # comments (pings) and other fields are ignored


def parse_events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    parser = _Parser()
    for line in lines:
        if (event := parser.feed(line)) is not None:
            yield event


async def aparse_events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    parser = _Parser()
    async for line in response.aiter_lines():
        if (event := parser.feed(line)) is not None:
            yield event
