"""The interface every upstream implements, and the line parser streamed answers share."""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from app.errors import BackendError
from app.schemas import GenerateRequest


@dataclass(slots=True)
class Completion:
    """What the upstream reports once it finishes: why it stopped and the token counts."""

    done_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(slots=True)
class ModelInfo:
    name: str
    size: int | None = None
    modified_at: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class BackendStatus:
    """A probe of the upstream: can it be reached, and does it have the default model."""

    reachable: bool
    model_available: bool
    reason: str | None = None


class Backend(Protocol):
    """One upstream LLM server: streams text chunks and fills in a Completion at the end."""

    name: str
    url: str
    default_model: str

    def stream(self, request: GenerateRequest, model: str, completion: Completion) -> AsyncIterator[str]:
        """Yield the answer's text chunks as they arrive; raise MiniVaultError subclasses on failure."""
        ...

    async def list_models(self) -> list[ModelInfo]:
        """The models the upstream can serve."""
        ...

    async def probe(self, seconds: float) -> BackendStatus:
        """Check reachability and the default model within `seconds`; never raises."""
        ...


async def iter_json_lines(chunks: AsyncIterator[bytes], source: str) -> AsyncIterator[dict[str, Any]]:
    """Parse newline-delimited JSON from byte chunks that may split a line anywhere."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\n" not in chunk:
            continue
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield _load_line(line, source)
    if buffer.strip():
        yield _load_line(buffer, source)


def _load_line(line: bytes, source: str) -> dict[str, Any]:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise BackendError(f"{source} sent a line that is not JSON: {line[:200]!r}") from None
    if not isinstance(event, dict):
        raise BackendError(f"{source} sent a line that is not a JSON object: {line[:200]!r}")
    return event
