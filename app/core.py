"""The generation flow shared by REST, SSE, WebSocket and CLI: call the upstream, time it, log it."""

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any, Literal

from app.backends import Backend, Completion
from app.errors import MiniVaultError
from app.interactions import JsonlWriter
from app.schemas import GenerateRequest

Endpoint = Literal["rest", "sse", "ws"]
Status = Literal["ok", "error", "cancelled"]


class Exchange:
    """One prompt's life: what was asked, the text so far, and the log line it leaves."""

    __slots__ = (
        "id", "endpoint", "client", "request", "prompt", "model", "backend", "ts", "started",
        "parts", "completion", "ttft_ms", "latency_ms", "status", "error",
    )  # fmt: skip

    def __init__(
        self,
        request_id: str,
        endpoint: Endpoint,
        client: str | None,
        request: GenerateRequest | None,
        backend: Backend,
        prompt: str | None = None,
    ) -> None:
        self.id = request_id
        self.endpoint = endpoint
        self.client = client
        self.request = request
        # A rejected request has no GenerateRequest, but whatever prompt it carried is still logged.
        self.prompt = request.prompt if request else prompt
        self.backend = backend.name
        self.model = (request.model if request else None) or backend.default_model
        self.ts = datetime.now(UTC)
        self.started = time.perf_counter()
        self.parts: list[str] = []
        self.completion = Completion()
        self.ttft_ms: float | None = None
        self.latency_ms: float | None = None
        self.status: Status = "ok"
        self.error: MiniVaultError | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def result(self) -> dict[str, Any]:
        """The answer as REST returns it, and as the SSE/WS `done` events carry it."""
        completion = self.completion
        return {
            "response": self.text,
            "model": self.model,
            "id": self.id,
            "done_reason": completion.done_reason,
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
            "timings": {"total_ms": self.latency_ms, "ttft_ms": self.ttft_ms},
        }

    def record(self) -> dict[str, Any]:
        """The line this exchange leaves in logs/log.jsonl."""
        request = self.request
        return {
            "id": self.id,
            "ts": self.ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "endpoint": self.endpoint,
            "client": self.client,
            "backend": self.backend,
            "model": self.model,
            "prompt": self.prompt,
            "system": request.system if request else None,
            "options": request.upstream_options() if request else None,
            "response": self.text,
            "status": self.status,
            "error": {"code": self.error.code, "message": self.error.message} if self.error else None,
            "done_reason": self.completion.done_reason,
            "prompt_tokens": self.completion.prompt_tokens,
            "completion_tokens": self.completion.completion_tokens,
            "ttft_ms": self.ttft_ms,
            "latency_ms": self.latency_ms,
        }

    def finish(self, log: JsonlWriter) -> None:
        self.latency_ms = round((time.perf_counter() - self.started) * 1000, 3)
        if self.status == "cancelled":
            self.completion.done_reason = "cancelled"
        log.write(self.record())


async def stream_generation(exchange: Exchange, backend: Backend, log: JsonlWriter) -> AsyncGenerator[str, None]:
    """Yield the answer's chunks; when the stream ends, however it ends, log the exchange once.

    Closing or cancelling the iterator closes the upstream request and logs `cancelled`
    with the partial text. Upstream failures are logged and re-raised as MiniVaultError.
    """
    assert exchange.request is not None
    parts = exchange.parts
    try:
        async with aclosing(backend.stream(exchange.request, exchange.model, exchange.completion)) as chunks:
            async for text in chunks:
                if not parts:
                    exchange.ttft_ms = round((time.perf_counter() - exchange.started) * 1000, 3)
                parts.append(text)
                yield text
    except MiniVaultError as exc:
        exchange.status = "error"
        exchange.error = exc
        raise
    except (asyncio.CancelledError, GeneratorExit):
        exchange.status = "cancelled"
        raise
    finally:
        exchange.finish(log)


async def run_generation(exchange: Exchange, backend: Backend, log: JsonlWriter) -> dict[str, Any]:
    """Generate the whole answer and return the REST body."""
    async with aclosing(stream_generation(exchange, backend, log)) as chunks:
        async for _ in chunks:
            pass
    return exchange.result()


def log_rejected(
    log: JsonlWriter, backend: Backend, request_id: str, endpoint: Endpoint, client: str | None,
    error: MiniVaultError, prompt: object = None,
) -> None:  # fmt: skip
    """Log a request refused before it reached the upstream, with whatever prompt it carried."""
    exchange = Exchange(request_id, endpoint, client, None, backend, prompt if isinstance(prompt, str) else None)
    exchange.status = "error"
    exchange.error = error
    exchange.finish(log)
