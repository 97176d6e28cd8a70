"""Ollama's native API: `/api/generate` for a plain prompt, `/api/chat` for a conversation, both
streamed as NDJSON; `/api/tags` for models and `/api/pull` for downloads."""

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import orjson

from app.backends.base import (
    BackendStatus,
    ChatInput,
    Completion,
    HttpBackend,
    LineSplitter,
    ModelInfo,
    Upstream,
    error_text,
    get_json,
    iter_json_lines,
    load_json_object,
    transport_error,
)
from app.backends.transport import failure_kind
from app.errors import BackendError, BackendUnavailable, InvalidRequest, MiniVaultError, ModelNotFound
from app.vocabulary import Event, Message

_JSON = {"Content-Type": "application/json"}


class OllamaBackend(HttpBackend):
    """Streams answers from one Ollama server through a pooled httpx client the caller owns."""

    name = "ollama"
    _busy_hint = ", or raise OLLAMA_MAX_QUEUE"
    # Ollama itself has no auth: a 401 comes from a proxy in front of it, which takes basic auth from the URL.
    _credentials_hint = "; put the proxy's user:password@ in OLLAMA_BASE_URL"

    def __init__(self, client: httpx.AsyncClient, url: str, default_model: str) -> None:
        upstream = Upstream(
            "Ollama", url, "start it with `ollama serve` or `docker compose up -d`, or point OLLAMA_BASE_URL at one"
        )
        super().__init__(client, url, default_model, upstream)

    async def stream(self, chat: ChatInput, completion: Completion) -> AsyncGenerator[Event, None]:
        """Yield text chunks as Ollama produces them; closing the iterator closes the upstream request."""
        if chat.conversation:
            path, payload = (
                "/api/chat",
                {"model": chat.model, "messages": [_message(m) for m in chat.messages], "stream": True},
            )
        else:
            path, payload = "/api/generate", {"model": chat.model, "prompt": chat.prompt, "stream": True}
            if chat.system is not None:
                payload["system"] = chat.system
        if chat.options is not None:
            payload["options"] = chat.options
        async with self._post_stream(path, payload, chat.model) as response:
            finished = False
            splitter = LineSplitter()
            # Read to the end of the body even after `done`: a response left unread cannot go
            # back to the pool, and every request would pay for a new connection.
            async for chunk in response.aiter_raw():
                for line in splitter.feed(chunk):
                    if finished or not line or line.isspace():
                        continue
                    event = load_json_object(line, "Ollama")
                    if "error" in event:
                        raise BackendError(f"Ollama: {event['error']}")
                    # /api/generate says `response`; /api/chat says `message.content`.
                    text = event["response"] if "response" in event else (event.get("message") or {}).get("content")
                    if text:
                        yield text
                    if event.get("done"):
                        completion.done_reason = event.get("done_reason")
                        completion.prompt_tokens = event.get("prompt_eval_count")
                        completion.completion_tokens = event.get("eval_count")
                        finished = True
            if not finished:
                raise BackendError("Ollama closed the stream before its final 'done' line; the answer is incomplete")

    async def pull(self, model: str) -> AsyncGenerator[dict[str, Any], None]:
        """Ollama's `/api/pull` progress lines (`status`, and `digest`/`total`/`completed` per layer)."""
        payload = orjson.dumps({"model": model, "stream": True})
        try:
            # Layers can take minutes; progress lines keep arriving, so only the gap between them is bounded.
            async with self._client.stream("POST", "/api/pull", content=payload, headers=_JSON) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _pull_error(model, error_text(response), response.status_code)
                async for event in iter_json_lines(response.aiter_bytes(), "Ollama"):
                    if "error" in event:
                        raise _pull_error(model, str(event["error"]))
                    yield event
                    if event.get("status") == "success":
                        return
                raise BackendError("Ollama closed the pull before reporting success")
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._upstream, self._client.timeout) from exc

    async def forward(self, method: str, path: str, body: bytes) -> httpx.Response:
        """Send a request of Ollama's own API on as it came, for the routes MiniVault passes through
        (`/api/pull`, `/api/delete`, ...); the caller reads and closes the streaming response."""
        request = self._client.build_request(method, path, content=body or None, headers=_JSON if body else None)
        try:
            return await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._upstream, self._client.timeout) from exc

    async def warm(self, model: str) -> None:
        """Load `model` into memory: Ollama loads a model for a generate request with no prompt."""
        try:
            response = await self._client.post("/api/generate", content=orjson.dumps({"model": model}), headers=_JSON)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._upstream, self._client.timeout) from exc
        if response.status_code != 200:
            raise await self._status_error(response, model)

    async def list_models(self) -> list[ModelInfo]:
        """The models Ollama has pulled, from `/api/tags`."""
        tags = await get_json(self._client, "/api/tags", self._upstream)
        return [_model_info(item) for item in tags.get("models", [])]

    async def inventory(self, seconds: float) -> tuple[list[ModelInfo], set[str]]:
        """For the host pool: answers at all (`/api/version`), its models (`/api/tags`), the loaded ones (`/api/ps`)."""
        try:
            version, tags, ps = await asyncio.gather(
                *(self._client.get(path, timeout=seconds) for path in ("/api/version", "/api/tags", "/api/ps"))
            )
            for response in (version, tags, ps):
                response.raise_for_status()
            models = [_model_info(item) for item in tags.json().get("models", [])]
            loaded = {item.get("name") or item.get("model", "") for item in ps.json().get("models", [])}
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            kind = failure_kind(exc) if isinstance(exc, httpx.HTTPError) else type(exc)
            raise BackendUnavailable(f"Ollama at {self.url} does not answer its checks ({kind.__name__})") from exc
        return models, loaded

    async def probe(self, seconds: float) -> BackendStatus:
        """Reachability and default-model check against `/api/tags`, bounded by `seconds`."""
        try:
            response = await self._client.get("/api/tags", timeout=seconds)
            response.raise_for_status()
            names = {item.get("name") for item in response.json().get("models", [])}
        except (httpx.HTTPError, ValueError) as exc:
            kind = failure_kind(exc) if isinstance(exc, httpx.HTTPError) else type(exc)
            return BackendStatus(False, False, f"Ollama is not answering at {self.url} ({kind.__name__})")
        if model_in(self.default_model, names):
            return BackendStatus(True, True)
        return BackendStatus(
            True, False, f"model '{self.default_model}' is not pulled; run `ollama pull {self.default_model}`"
        )

    async def _missing_model(self, model: str) -> MiniVaultError:
        installed = await self._listed_models("/api/tags")
        return ModelNotFound(
            f"model '{model}' is not installed in Ollama (installed: {installed}); pull it with `ollama pull {model}`"
        )


def _message(message: Message) -> dict[str, Any]:
    return {"role": message.role, "content": message.content}


def _model_info(item: dict[str, Any]) -> ModelInfo:
    return ModelInfo(
        name=item.get("name") or item.get("model", ""),
        size=item.get("size"),
        modified_at=item.get("modified_at"),
        details=item.get("details") or {},
    )


def _pull_error(model: str, message: str, status: int | None = None) -> MiniVaultError:
    """A refused pull: the name's fault (4xx, so the caller can fix it) or Ollama's (502)."""
    if "file does not exist" in message or status == 404:
        return ModelNotFound(f"Ollama's registry has no model '{model}' ({message})")
    if status == 400 or "invalid model name" in message:
        return InvalidRequest(f"Ollama refused to pull '{model}': {message}")
    if status is not None:
        return BackendError(f"Ollama answered {status} to pull: {message}")
    return BackendError(f"Ollama: {message}")


def model_in(model: str, names: set[str | None]) -> bool:
    """Ollama treats a name without a tag as `:latest`."""
    return model in names or (":" not in model and f"{model}:latest" in names)
