"""Ollama's native API: `POST /api/generate` streamed as NDJSON, and `/api/tags` for models."""

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from app.backends.base import BackendStatus, Completion, ModelInfo, iter_json_lines
from app.errors import BackendError, BackendTimeout, BackendUnavailable, MiniVaultError, ModelNotFound
from app.schemas import GenerateRequest

logger = logging.getLogger(__name__)

_JSON = {"Content-Type": "application/json"}


class OllamaBackend:
    """Streams answers from one Ollama server through a pooled httpx client the caller owns."""

    name = "ollama"

    def __init__(self, client: httpx.AsyncClient, url: str, default_model: str) -> None:
        self._client = client
        self.url = url
        self.default_model = default_model

    async def stream(self, request: GenerateRequest, model: str, completion: Completion) -> AsyncIterator[str]:
        """Yield text chunks as Ollama produces them; closing the iterator closes the upstream request."""
        payload: dict[str, Any] = {"model": model, "prompt": request.prompt, "stream": True}
        if request.system is not None:
            payload["system"] = request.system
        if request.options is not None:
            payload["options"] = request.upstream_options()
        try:
            async with self._client.stream(
                "POST", "/api/generate", content=orjson.dumps(payload), headers=_JSON
            ) as response:
                if response.status_code != 200:
                    raise await self._status_error(response, model)
                async for event in iter_json_lines(response.aiter_bytes(), "Ollama"):
                    if "error" in event:
                        raise BackendError(f"Ollama: {event['error']}")
                    text = event.get("response")
                    if text:
                        yield text
                    if event.get("done"):
                        completion.done_reason = event.get("done_reason")
                        completion.prompt_tokens = event.get("prompt_eval_count")
                        completion.completion_tokens = event.get("eval_count")
                        return
                raise BackendError("Ollama closed the stream before its final 'done' line; the answer is incomplete")
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc

    async def list_models(self) -> list[ModelInfo]:
        """The models Ollama has pulled, from `/api/tags`."""
        try:
            response = await self._client.get("/api/tags")
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        if response.status_code != 200:
            raise BackendError(f"Ollama answered {response.status_code} to /api/tags: {_error_text(response)}")
        return [
            ModelInfo(
                name=item.get("name") or item.get("model", ""),
                size=item.get("size"),
                modified_at=item.get("modified_at"),
                details=item.get("details") or {},
            )
            for item in response.json().get("models", [])
        ]

    async def probe(self, seconds: float) -> BackendStatus:
        """Reachability and default-model check against `/api/tags`, bounded by `seconds`."""
        try:
            response = await self._client.get("/api/tags", timeout=seconds)
            response.raise_for_status()
            names = {item.get("name") for item in response.json().get("models", [])}
        except (httpx.HTTPError, ValueError) as exc:
            return BackendStatus(False, False, f"Ollama is not answering at {self.url} ({type(exc).__name__})")
        if model_in(self.default_model, names):
            return BackendStatus(True, True)
        return BackendStatus(
            True, False, f"model '{self.default_model}' is not pulled; run `ollama pull {self.default_model}`"
        )

    async def _status_error(self, response: httpx.Response, model: str) -> MiniVaultError:
        await response.aread()
        text = _error_text(response)
        if response.status_code == 404:
            return ModelNotFound(await self._missing_model_message(model))
        return BackendError(f"Ollama answered {response.status_code}: {text}")

    async def _missing_model_message(self, model: str) -> str:
        try:
            installed = ", ".join(sorted(info.name for info in await self.list_models())) or "none"
        except MiniVaultError:
            installed = "unknown: /api/tags failed too"
        return (
            f"model '{model}' is not installed in Ollama (installed: {installed}); pull it with `ollama pull {model}`"
        )

    def _transport_error(self, exc: httpx.HTTPError) -> MiniVaultError:
        timeout = self._client.timeout
        if isinstance(exc, httpx.ConnectTimeout):
            return BackendTimeout(
                f"Ollama at {self.url} did not accept a connection within {timeout.connect} s "
                "(connect timeout; raise MINIVAULT_CONNECT_TIMEOUT)"
            )
        if isinstance(exc, httpx.ReadTimeout):
            return BackendTimeout(
                f"Ollama at {self.url} sent nothing for {timeout.read} s (read timeout; raise MINIVAULT_READ_TIMEOUT)"
            )
        if isinstance(exc, httpx.PoolTimeout):
            return BackendTimeout(
                f"every pooled connection to Ollama stayed busy for {timeout.pool} s "
                "(raise MINIVAULT_UPSTREAM_MAX_CONNECTIONS)"
            )
        if isinstance(exc, httpx.TimeoutException):
            return BackendTimeout(f"Ollama at {self.url} timed out: {exc}")
        if isinstance(exc, httpx.ConnectError):
            return BackendUnavailable(
                f"cannot reach Ollama at {self.url}: start it with `ollama serve` or `docker compose up -d`, "
                "or point OLLAMA_BASE_URL at a running one"
            )
        logger.warning("Ollama transport error: %r", exc)
        return BackendError(f"the connection to Ollama at {self.url} broke: {exc or type(exc).__name__}")


def model_in(model: str, names: set[str | None]) -> bool:
    """Ollama treats a name without a tag as `:latest`."""
    return model in names or (":" not in model and f"{model}:latest" in names)


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.text)
    except ValueError:
        return response.text[:500] or response.reason_phrase
