"""Ollama's native API: `/api/generate` for a plain prompt, `/api/chat` for a conversation, both
streamed as NDJSON; `/api/tags` for models, `/api/show` for what a model can do, `/api/pull` for downloads."""

import asyncio
import base64
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import orjson

from app.backends.base import (
    COMPLETION,
    BackendStatus,
    ChatInput,
    Completion,
    HttpBackend,
    LineSplitter,
    ModelInfo,
    Upstream,
    check_capabilities,
    error_text,
    get_json,
    iter_json_lines,
    load_json_object,
    transport_error,
)
from app.backends.transport import failure_kind
from app.errors import BackendError, BackendUnavailable, InvalidRequest, MiniVaultError, ModelNotFound
from app.vocabulary import Event, Message, ThinkingDelta, Tool, ToolCall, ToolCallDelta, json_object, json_text

_JSON = {"Content-Type": "application/json"}
# What /api/show says of a model, kept this long for this many models: asked once per model and minute, not
# per request, and still seen when a model is re-created with another template.
_CAPABILITIES_SECONDS = 60.0
_CAPABILITIES_KEPT = 256


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
        # Model name -> (when asked, its capabilities), oldest first.
        self._capabilities: dict[str, tuple[float, frozenset[str]]] = {}

    async def stream(self, chat: ChatInput, completion: Completion) -> AsyncGenerator[Event, None]:
        """Yield the answer's events as Ollama produces them; closing the iterator closes the upstream request.

        The request carries Ollama's native fields. `tool_choice` has no Ollama field: "none" sends no tools,
        a named function only that tool, and "required" the tools as they are (Ollama cannot enforce a call).
        A request beyond text is first checked against the model's capabilities (/api/show), so a model
        without tools is a 400 before anything is generated.
        """
        plain = chat.plain
        if not plain:
            known = await self._shown_capabilities(chat.model)
            if known is not None:  # an Ollama too old to say: it decides itself
                check_capabilities(chat, known)
        if chat.conversation:
            messages = [_message(m) for m in chat.messages] if plain else _messages(chat.messages)
            path, payload = "/api/chat", {"model": chat.model, "messages": messages, "stream": True}
        else:
            path, payload = "/api/generate", {"model": chat.model, "prompt": chat.prompt, "stream": True}
            if chat.system is not None:
                payload["system"] = chat.system
        if chat.options is not None:
            payload["options"] = chat.options
        # Both count as plain when false, and must still reach Ollama: `think: false` stops a thinking model.
        if chat.think is not None:
            payload["think"] = chat.think
        if chat.keep_alive is not None:
            payload["keep_alive"] = chat.keep_alive
        if not plain:
            _add_features(payload, chat)
        async with self._post_stream(path, payload, chat.model) as response:
            finished = False
            calls = 0
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
                    # /api/generate says `response` (and `thinking` beside it); /api/chat says `message.content`
                    # (and `message.thinking`, `message.tool_calls`): a text line has nothing else to look at.
                    if "response" in event:
                        text, extra = event["response"], event if "thinking" in event else None
                    else:
                        message = event.get("message") or {}
                        text, extra = message.get("content"), message if len(message) > 2 else None
                    if extra is not None and extra.get("thinking"):
                        yield ThinkingDelta(extra["thinking"])
                    if text:
                        yield text
                    if extra is not None:
                        # Ollama sends each call whole: one delta per call, numbered across the answer.
                        for call in extra.get("tool_calls") or ():
                            yield _call_delta(calls, call)
                            calls += 1
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

    async def warm(self, model: str, keep_alive: str | int | float | None = None) -> None:
        """Load `model` into memory: Ollama loads a model for a generate request with no prompt.

        `keep_alive` is passed on: how long the model then stays loaded, and with 0, unload it now.
        """
        body: dict[str, Any] = {"model": model}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        try:
            response = await self._client.post("/api/generate", content=orjson.dumps(body), headers=_JSON)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._upstream, self._client.timeout) from exc
        if response.status_code != 200:
            raise await self._status_error(response, model)

    async def capabilities(self, model: str) -> frozenset[str]:
        """What `model` can do, from Ollama's /api/show `capabilities` (just `completion` when it does not say)."""
        known = await self._shown_capabilities(model)
        return known if known is not None else frozenset({COMPLETION})

    async def _shown_capabilities(self, model: str) -> frozenset[str] | None:
        """The capabilities /api/show lists for `model`, cached; None when it does not answer or list them."""
        now = time.monotonic()
        cached = self._capabilities.get(model)
        if cached is not None and now - cached[0] < _CAPABILITIES_SECONDS:
            return cached[1]
        try:
            response = await self._client.post("/api/show", content=orjson.dumps({"model": model}), headers=_JSON)
            listed = response.json().get("capabilities") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        if not isinstance(listed, list):
            return None
        found = frozenset(name for name in listed if isinstance(name, str))
        self._capabilities.pop(model, None)
        if len(self._capabilities) >= _CAPABILITIES_KEPT:
            del self._capabilities[next(iter(self._capabilities))]
        self._capabilities[model] = (now, found)
        return found

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


def _messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """Messages in Ollama's words: images as base64, an assistant's calls and thinking, a tool result's tool name."""
    names: dict[str, str] = {}  # call id -> tool name, for results that name only the call (OpenAI's clients)
    sent = []
    for i, message in enumerate(messages):
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.images:
            item["images"] = [base64.b64encode(image.data).decode("ascii") for image in message.images]
        if message.thinking:
            item["thinking"] = message.thinking
        if message.tool_calls:
            item["tool_calls"] = [_sent_call(call, f"messages[{i}].tool_calls[{k}]")
                                  for k, call in enumerate(message.tool_calls)]  # fmt: skip
            names.update((call.id, call.name) for call in message.tool_calls if call.id)
        if message.role == "tool":
            name = message.tool_name or names.get(message.tool_call_id or "")
            if name:
                item["tool_name"] = name
            if message.tool_call_id:
                item["tool_call_id"] = message.tool_call_id
        sent.append(item)
    return sent


def _sent_call(call: ToolCall, field: str) -> dict[str, Any]:
    """An assistant's earlier call as Ollama takes it: the arguments are an object, embedded as the model wrote them
    (re-encoding them would change the next prompt, and the prompt cache with it)."""
    text = call.arguments.strip() or "{}"
    if not json_object(text):
        raise InvalidRequest(f"{field}.function.arguments: Ollama takes a call's arguments as a JSON object; "
                             f"these are not one ({call.arguments!r:.60})")  # fmt: skip
    sent: dict[str, Any] = {"function": {"name": call.name, "arguments": orjson.Fragment(text)}}
    if call.id:
        sent["id"] = call.id
    return sent


def _add_features(payload: dict[str, Any], chat: ChatInput) -> None:
    """What a request asks beyond text, in Ollama's fields: tools, the format, and on generate images and FIM."""
    tools = _offered(chat)
    if tools:
        payload["tools"] = _encodable([{"type": "function", "function": _function(tool)} for tool in tools])
    if chat.format is not None:
        payload["format"] = "json" if chat.format.schema is None else _encodable(chat.format.schema)
    if not chat.conversation:
        images = chat.messages[-1].images
        if images:
            payload["images"] = [base64.b64encode(image.data).decode("ascii") for image in images]
        if chat.suffix:
            payload["suffix"] = chat.suffix
        if chat.raw:
            payload["raw"] = True


def _encodable(value: Any) -> Any:
    """`value`, or its JSON text when it holds an integer beyond 64 bits, which orjson cannot write (Go reads it)."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return orjson.Fragment(json_text(value))
    return value


def _offered(chat: ChatInput) -> tuple[Tool, ...]:
    """The tools to send, after `tool_choice` (which Ollama has no field for)."""
    choice = chat.tool_choice
    if choice is None or choice.mode in ("auto", "required"):
        # "required" cannot be enforced by Ollama: the tools are offered, and the model may still answer in text.
        return chat.tools
    if choice.mode == "none":
        return ()
    chosen = tuple(tool for tool in chat.tools if tool.name == choice.name)
    if not chosen:
        raise InvalidRequest(f"tool_choice: names the function {choice.name!r}, which is not among the tools offered")
    return chosen


def _function(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters
    return function


def _call_delta(index: int, call: object) -> ToolCallDelta:
    """One of Ollama's whole calls, `{"id"?, "function": {"index", "name", "arguments": {...}}}`, as a delta."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise BackendError(f"Ollama sent a tool call that is not one: {orjson.dumps(call)[:200]!r}")
    function = call["function"]
    arguments = function.get("arguments")
    text = arguments if isinstance(arguments, str) else orjson.dumps({} if arguments is None else arguments).decode()
    return ToolCallDelta(index, call.get("id") or None, function.get("name") or "", text)


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
