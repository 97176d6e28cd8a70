"""Any OpenAI-compatible server (llama.cpp's llama-server, vLLM, LM Studio, LocalAI, Ollama's /v1).

`POST /v1/chat/completions` with `stream: true`, read as Server-Sent Events.
"""

from collections.abc import AsyncGenerator
from typing import Any

import httpx

from app.backends.base import (
    BackendStatus,
    ChatInput,
    Completion,
    HttpBackend,
    LineSplitter,
    ModelInfo,
    Upstream,
    get_json,
    load_json_object,
    sse_data,
)
from app.errors import BackendError, BackendUnavailable, MiniVaultError, ModelNotFound
from app.vocabulary import Event

# Ollama option -> request field. OpenAI's own, then the sampling extensions llama.cpp and vLLM accept.
_OPTION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
}


class OpenAICompatBackend(HttpBackend):
    """Streams chat completions from an OpenAI-compatible server through a pooled httpx client."""

    _credentials_hint = "; set OPENAI_API_KEY to a key it accepts"

    def __init__(
        self, client: httpx.AsyncClient, url: str, default_model: str, *, name: str = "openai", upstream: Upstream
    ) -> None:
        super().__init__(client, url, default_model, upstream)
        self.name = name

    async def stream(self, chat: ChatInput, completion: Completion) -> AsyncGenerator[Event, None]:
        """Yield content deltas as they arrive; closing the iterator closes the upstream request."""
        self.check_model(chat.model)
        if chat.options:
            # Ollama's load-time options (num_ctx, num_gpu, ...) are the server's own settings here: accepted, named.
            completion.ignored_options = ignored_options(chat.options)
        label = self._upstream.label
        finished = ended = False
        async with self._post_stream("/v1/chat/completions", self._payload(chat), chat.model) as response:
            splitter = LineSplitter()
            async for chunk in response.aiter_raw():
                for line in splitter.feed(chunk):
                    data = sse_data(line)
                    if data is None or ended:
                        continue
                    if data == b"[DONE]":
                        # Read on to the end of the body so the connection goes back to the pool.
                        ended = True
                        continue
                    event = load_json_object(data, label)
                    if "error" in event:
                        raise BackendError(f"{label}: {_message(event['error'])}")
                    for choice in event.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
                        if choice.get("finish_reason"):
                            completion.done_reason = choice["finish_reason"]
                            finished = True
                    if usage := event.get("usage"):
                        completion.prompt_tokens = usage.get("prompt_tokens")
                        completion.completion_tokens = usage.get("completion_tokens")
        if not (finished or ended):
            raise BackendError(f"{label} closed the stream before it finished; the answer is incomplete")

    def check_model(self, model: str) -> None:
        """Refuse a model before calling the server; a general server decides for itself."""

    def _payload(self, chat: ChatInput) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": chat.model,
            "messages": [{"role": m.role, "content": m.content} for m in chat.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for option, value in (chat.options or {}).items():
            name = _OPTION_FIELDS.get(option)
            if name is None or (option == "num_predict" and value < 0):
                continue  # load-time (ignored_options names them); num_predict -1/-2 is the server's default
            payload[name] = value
        return payload

    async def warm(self, model: str) -> None:
        """Nothing to do: an OpenAI-compatible server loads its model itself."""

    async def list_models(self) -> list[ModelInfo]:
        """The models the server lists at `/v1/models`."""
        listing = await get_json(self._client, "/v1/models", self._upstream)
        return [
            ModelInfo(name=item.get("id", ""), details={"owned_by": item.get("owned_by")})
            for item in listing.get("data", [])
        ]

    async def inventory(self, seconds: float) -> tuple[list[ModelInfo], set[str]]:
        """For the host pool: the models `/v1/models` lists, all of them loaded (such servers load what they serve)."""
        try:
            response = await self._client.get("/v1/models", timeout=seconds)
            response.raise_for_status()
            models = [ModelInfo(str(item.get("id"))) for item in response.json().get("data", [])]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise BackendUnavailable(
                f"{self._upstream.label} at {self.url} does not answer its checks ({type(exc).__name__})"
            ) from exc
        return models, {m.name for m in models}

    async def probe(self, seconds: float) -> BackendStatus:
        """Reachability and default-model check against `/v1/models`, bounded by `seconds`."""
        label = self._upstream.label
        try:
            response = await self._client.get("/v1/models", timeout=seconds)
            response.raise_for_status()
            ids = {item.get("id") for item in response.json().get("data", [])}
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return BackendStatus(False, False, f"{label} is not answering at {self.url} ({type(exc).__name__})")
        if self.default_model in ids:
            return BackendStatus(True, True)
        return BackendStatus(True, False, f"{label} does not list model '{self.default_model}' (it lists: "
                                          f"{', '.join(sorted(map(str, ids))) or 'none'})")  # fmt: skip

    async def _missing_model(self, model: str) -> MiniVaultError:
        served = await self._listed_models("/v1/models")
        return ModelNotFound(
            f"model '{model}' is not served by {self._upstream.label} at {self.url} (it serves: {served}); "
            "name one of those, or set OPENAI_MODEL"
        )


def ignored_options(options: dict[str, Any]) -> tuple[str, ...]:
    """The options an OpenAI-compatible server cannot take per request, sorted."""
    return tuple(sorted(option for option in options if option not in _OPTION_FIELDS))


def _message(error: object) -> str:
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)
