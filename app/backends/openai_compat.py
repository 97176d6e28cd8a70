"""Any OpenAI-compatible server (llama.cpp's llama-server, vLLM, LM Studio, LocalAI, Ollama's /v1).

`POST /v1/chat/completions` with `stream: true`, read as Server-Sent Events: text, `reasoning_content`
(or vLLM's `reasoning`) as thinking, and `tool_calls` deltas. Fill-in-the-middle goes to llama.cpp's
`/infill`, else to `/v1/completions` with `suffix` (Ollama's /v1 takes it); a raw prompt to `/v1/completions`.
"""

import base64
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from app.backends.base import (
    COMPLETION,
    INSERT,
    THINKING,
    TOOLS,
    VISION,
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
    transport_error,
)
from app.backends.embedded_features import ContextOverflow, fit_messages
from app.errors import (
    BackendError,
    BackendUnavailable,
    ContextTooLong,
    InvalidRequest,
    MiniVaultError,
    MissingCapability,
    ModelNotFound,
)
from app.vocabulary import Event, Message, ThinkingDelta, ToolCallDelta

logger = logging.getLogger(__name__)

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
# llama.cpp's native names, for /infill (its own endpoint, not the OpenAI-compatible one).
_INFILL_FIELDS = {**_OPTION_FIELDS, "num_predict": "n_predict"}
# A general server decides for itself what a model can do (its own 400 says no).
GENERAL_CAPABILITIES = frozenset({COMPLETION, TOOLS, VISION, THINKING, INSERT})
# Where fill-in-the-middle is tried, in order: llama.cpp's endpoint, then OpenAI's `suffix` (vLLM, Ollama's /v1).
_INFILL, _COMPLETIONS = "/infill", "/v1/completions"
# Tokens a chat template adds per message (role markers, separators) and once per prompt; generous, since the
# server's template is not known here (ChatML adds about 5 per message, Llama 3 about 6).
_MESSAGE_ALLOWANCE, _PROMPT_ALLOWANCE = 8, 16
# Without max_tokens, this share of the context is kept free for the answer.
_ANSWER_SHARE = 4
# Below this many tokens the context is not asked for: a chat that fits it fits any server's (smaller ones decide).
_SMALLEST_CONTEXT = 512


@dataclass(frozen=True)
class _Context:
    """A model's context as its server told it, and whose `/tokenize` counts its tokens."""

    tokens: int
    vllm: bool  # vLLM's /tokenize ({"model", "prompt"} -> count), else llama-server's ({"content"} -> tokens)


class _NoTokenizer(Exception):
    """The server would not count tokens; the request goes as it is and the server decides."""


class _NoRoute(Exception):
    """The server has no such endpoint (404), or has it without support for this model (501)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(status, text)
        self.status, self.text = status, text


class OpenAICompatBackend(HttpBackend):
    """Streams chat completions from an OpenAI-compatible server through a pooled httpx client."""

    _credentials_hint = "; set OPENAI_API_KEY to a key it accepts"

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        default_model: str,
        *,
        name: str = "openai",
        upstream: Upstream,
        capabilities: frozenset[str] = GENERAL_CAPABILITIES,
    ) -> None:
        super().__init__(client, url, default_model, upstream)
        self.name = name
        self._capabilities = capabilities
        # The fill-in-the-middle endpoint that answered last (None: not tried yet).
        self._infill_path: str | None = None
        # Each model's context, learnt on its first chat (None: the server does not say).
        self._contexts: dict[str, _Context | None] = {}

    async def capabilities(self, model: str) -> frozenset[str]:
        """What the server is asked to do for any model; it refuses what a model cannot (and that 400 passes on)."""
        return self._capabilities

    async def stream(self, chat: ChatInput, completion: Completion) -> AsyncGenerator[Event, None]:
        """Yield the answer's events as they arrive; closing the iterator closes the upstream request."""
        self.check_model(chat.model)
        if chat.options:
            # Ollama's load-time options (num_ctx, num_gpu, ...) are the server's own settings here: accepted, named.
            completion.ignored_options = ignored_options(chat.options)
        if chat.suffix or chat.raw:
            if any(m.images for m in chat.messages):
                raise InvalidRequest(
                    f"images cannot go with {'suffix' if chat.suffix else 'raw'} to {self._upstream.label}: a prompt "
                    "sent as it is has no place for them; send them in a chat"
                )
            async with self._prompt_stream(chat) as (response, path):
                async for piece in self._read_prompt_answer(response, path, completion):
                    yield piece
            return
        payload = self._payload(chat)
        if chat.model in self._contexts:
            context = self._contexts[chat.model]
        elif _surely_fits(payload, _SMALLEST_CONTEXT):
            context = None  # short enough for any context: not worth a call to the server
        else:
            context = await self._context(chat.model)
        if context is not None and not _surely_fits(payload, context.tokens):
            await self._fit_context(payload, context, chat.model, completion)
        label = self._upstream.label
        finished = False
        frames = SseFrames(label)
        async with self._post_stream("/v1/chat/completions", payload, chat.model) as response:
            async for chunk in response.aiter_raw():
                for event in frames.feed(chunk):
                    for choice in event.get("choices") or ():
                        delta = choice.get("delta") or {}
                        text = delta.get("content")
                        if text and len(delta) == 1:  # text alone: the per-token case, with nothing else to read
                            yield text
                        elif delta:
                            # vLLM's newer servers call it `reasoning`; llama.cpp and DeepSeek `reasoning_content`.
                            thinking = delta.get("reasoning_content") or delta.get("reasoning")
                            if thinking:
                                yield ThinkingDelta(thinking)
                            if text:
                                yield text
                            for call in delta.get("tool_calls") or ():
                                yield tool_call_delta(call, label)
                        reason = choice.get("finish_reason")
                        if reason:
                            # The dialects tell tool calls by the calls made; the reason stays Ollama's word.
                            completion.done_reason = "stop" if reason == "tool_calls" else reason
                            finished = True
                    if usage := event.get("usage"):
                        completion.prompt_tokens = usage.get("prompt_tokens")
                        completion.completion_tokens = usage.get("completion_tokens")
        if not (finished or frames.done):
            raise BackendError(f"{label} closed the stream before it finished; the answer is incomplete")

    def check_model(self, model: str) -> None:
        """Refuse a model before calling the server; a general server decides for itself."""

    # --- a conversation fitted to the model's context ---------------------------------------------------------

    async def _context(self, model: str) -> _Context | None:
        """The model's context, from llama-server's `/props` or vLLM's `/v1/models`, asked once per model."""
        found: _Context | None = None
        try:
            response = await self._client.get("/props")
            if response.status_code == 200:
                settings = response.json().get("default_generation_settings") or {}
                n_ctx = settings.get("n_ctx")
                if type(n_ctx) is int and n_ctx > 0:
                    found = _Context(n_ctx, vllm=False)
            if found is None:
                response = await self._client.get("/v1/models")
                if response.status_code == 200:
                    for item in response.json().get("data") or ():
                        length = item.get("max_model_len")
                        if item.get("id") == model and type(length) is int and length > 0:
                            found = _Context(length, vllm=True)
        except httpx.HTTPError:
            return None  # not remembered: the chat request reports the failure, and the next one asks again
        except (ValueError, AttributeError):
            found = None
        self._contexts[model] = found
        return found

    async def _fit_context(
        self, payload: dict[str, Any], context: _Context, model: str, completion: Completion
    ) -> None:
        """Keep the system prompt and the newest messages that fit the context, counted by the server's tokenizer."""
        counted: dict[int, int] = {}

        async def count(message: dict[str, Any]) -> int:
            if id(message) not in counted:
                text = _content_text(message.get("content"))
                if message.get("tool_calls"):
                    text += orjson.dumps(message["tool_calls"]).decode()
                counted[id(message)] = await self._server_tokens(text, context, model) + _MESSAGE_ALLOWANCE
            return counted[id(message)]

        messages = payload["messages"]
        try:
            whole = context.tokens - _PROMPT_ALLOWANCE
            if payload.get("tools"):
                whole -= await self._server_tokens(orjson.dumps(payload["tools"]).decode(), context, model)
            try:
                kept, dropped = await fit_messages(messages, count, whole - _answer_room(payload, context.tokens))
            except ContextOverflow as overflow:
                if overflow.needed > whole:
                    error = ContextTooLong(
                        f"messages: the conversation's newest message needs {overflow.needed} tokens with its system "
                        f"prompt, but the {context.tokens}-token context of model '{model}' on {self._upstream.label} "
                        f"leaves {whole}; it cannot fit. Shorten the message, or start the server with a larger "
                        "context (llama-server --ctx-size, vLLM --max-model-len)"
                    )
                    error.param = "messages"
                    raise error from None
                # The newest turn fits only without the answer's room: it goes alone, the answer gets what is left.
                kept, dropped = await fit_messages(messages, count, overflow.needed)
        except _NoTokenizer as refused:
            logger.warning("%s: cannot count tokens (%s); the conversation goes as it is", self.name, refused)
            return
        if dropped:
            payload["messages"] = kept
            completion.dropped_messages = dropped
            logger.info(
                "%s: dropped the %d oldest of %d messages to fit the %d-token context of model '%s'",
                self.name,
                dropped,
                len(messages),
                context.tokens,
                model,
            )

    async def _server_tokens(self, text: str, context: _Context, model: str) -> int:
        """How many tokens the server's tokenizer makes of `text` (without BOS and the like)."""
        if not text:
            return 0
        if context.vllm:
            body: dict[str, Any] = {"model": model, "prompt": text, "add_special_tokens": False}
        else:
            body = {"content": text, "add_special": False}
        try:
            response = await self._client.post("/tokenize", content=orjson.dumps(body), headers=self._JSON)
            if response.status_code != 200:
                raise _NoTokenizer(f"/tokenize answered {response.status_code}: {_short(response)}")
            answer = response.json()
            counted = answer.get("count") if context.vllm else len(answer.get("tokens"))
        except httpx.HTTPError as exc:
            raise _NoTokenizer(f"/tokenize failed: {type(exc).__name__}") from exc
        except (ValueError, AttributeError, TypeError) as exc:
            raise _NoTokenizer("/tokenize answered something else than a token list") from exc
        if type(counted) is not int:
            raise _NoTokenizer("/tokenize answered without a count")
        return counted

    def _payload(self, chat: ChatInput) -> dict[str, Any]:
        """The `/v1/chat/completions` body for `chat`: messages, sampling fields, and what the answer may hold."""
        if chat.plain:
            messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        else:
            messages = openai_messages(chat.messages)
        payload: dict[str, Any] = {
            "model": chat.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        _add_options(payload, chat.options, _OPTION_FIELDS)
        if chat.plain:
            return payload
        if chat.tools:
            payload["tools"] = [
                {"type": "function", "function": {"name": tool.name, "parameters": tool.parameters}
                 | ({"description": tool.description} if tool.description is not None else {})}
                for tool in chat.tools
            ]  # fmt: skip
        choice = chat.tool_choice
        if choice is not None and chat.tools:
            payload["tool_choice"] = (
                {"type": "function", "function": {"name": choice.name}} if choice.mode == "function" else choice.mode
            )
        if chat.parallel_tool_calls is not None:
            payload["parallel_tool_calls"] = chat.parallel_tool_calls
        answer_format = chat.format
        if answer_format is not None:
            if answer_format.schema is None:
                payload["response_format"] = {"type": "json_object"}
            else:
                spec: dict[str, Any] = {"name": answer_format.name or "answer", "schema": answer_format.schema}
                if answer_format.strict is not None:
                    spec["strict"] = answer_format.strict
                payload["response_format"] = {"type": "json_schema", "json_schema": spec}
        if chat.think:  # False and None: the server's default (OpenAI's API has no "off")
            payload["reasoning_effort"] = "medium" if chat.think is True else chat.think
        return payload

    # --- a prompt without the chat template: fill-in-the-middle, or raw ------------------------------------

    @asynccontextmanager
    async def _prompt_stream(self, chat: ChatInput) -> AsyncIterator[tuple[httpx.Response, str]]:
        """The streaming response to a prompt sent as it is, and the path that answered it.

        A suffix goes to the fill-in-the-middle endpoint that answered before, else each in turn; when the
        server has none, a 400 says so (never an answer that ignored the suffix).
        """
        if not chat.suffix:
            async with self._post_stream(_COMPLETIONS, self._completion_payload(chat), chat.model) as response:
                yield response, _COMPLETIONS
            return
        paths = (self._infill_path,) if self._infill_path else (_INFILL, _COMPLETIONS)
        refusals: list[tuple[str, int, str]] = []
        for path in paths:
            payload = self._infill_payload(chat) if path == _INFILL else self._completion_payload(chat)
            try:
                async with self._post_absent(path, payload, chat.model) as response:
                    self._infill_path = path
                    yield response, path
                    return
            except _NoRoute as absent:
                refusals.append((path, absent.status, absent.text))
                if absent.status == 501:
                    break  # llama.cpp has /infill, but this model has no fill-in-the-middle tokens
        self._infill_path = None
        if all(status == 404 for _, status, _ in refusals) and not await self._serves(chat.model):
            raise await self._missing_model(chat.model)
        answers = "; ".join(f"{path} answered {status}: {text}" for path, status, text in refusals)
        raise MissingCapability(
            f"{self._upstream.label} at {self.url} has no fill-in-the-middle for model '{chat.model}' ({answers}); "
            "send the prompt without `suffix`, or serve a model with FIM tokens (a code model such as "
            "Qwen2.5-Coder) with llama.cpp's llama-server"
        )

    @asynccontextmanager
    async def _post_absent(self, path: str, payload: dict[str, Any], model: str) -> AsyncIterator[httpx.Response]:
        """Like _post_stream, but a 404 or 501 raises _NoRoute, so the caller can try elsewhere."""
        try:
            async with self._client.stream("POST", path, content=orjson.dumps(payload), headers=self._JSON) as response:
                if response.status_code in (404, 501):
                    await response.aread()
                    raise _NoRoute(response.status_code, _short(response))
                if response.status_code != 200:
                    raise await self._status_error(response, model)
                yield response
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._upstream, self._client.timeout) from exc

    async def _serves(self, model: str) -> bool:
        """Whether `/v1/models` lists `model` (True when it cannot be read: the 404 is then not the model's)."""
        try:
            return model in {info.name for info in await self.list_models()}
        except MiniVaultError:
            return True

    def _completion_payload(self, chat: ChatInput) -> dict[str, Any]:
        """`/v1/completions`: the prompt as it is (no chat template), with the suffix when there is one."""
        payload: dict[str, Any] = {
            "model": chat.model, "prompt": chat.prompt, "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        if chat.suffix:
            payload["suffix"] = chat.suffix
        _add_options(payload, chat.options, _OPTION_FIELDS)
        return payload

    def _infill_payload(self, chat: ChatInput) -> dict[str, Any]:
        """llama.cpp's `/infill`: the text before and after the gap, and its own sampling names."""
        payload: dict[str, Any] = {
            "model": chat.model, "input_prefix": chat.prompt, "input_suffix": chat.suffix, "stream": True,
        }  # fmt: skip
        _add_options(payload, chat.options, _INFILL_FIELDS)
        return payload

    async def _read_prompt_answer(
        self, response: httpx.Response, path: str, completion: Completion
    ) -> AsyncGenerator[str, None]:
        """The text of a `/v1/completions` stream (`choices[].text`) or an `/infill` one (`content`, `stop`)."""
        label = self._upstream.label
        finished = False
        frames = SseFrames(label)
        async for chunk in response.aiter_raw():
            for event in frames.feed(chunk):
                if path == _INFILL:
                    if text := event.get("content"):
                        yield text
                    if event.get("stop"):
                        completion.done_reason = "length" if event.get("stop_type") == "limit" else "stop"
                        completion.prompt_tokens = event.get("tokens_evaluated")
                        completion.completion_tokens = event.get("tokens_predicted")
                        finished = True
                    continue
                for choice in event.get("choices") or ():
                    if text := choice.get("text"):
                        yield text
                    if reason := choice.get("finish_reason"):
                        completion.done_reason = reason
                        finished = True
                if usage := event.get("usage"):
                    completion.prompt_tokens = usage.get("prompt_tokens")
                    completion.completion_tokens = usage.get("completion_tokens")
        if not (finished or frames.done):
            raise BackendError(f"{label} closed the stream before it finished; the answer is incomplete")

    async def warm(self, model: str) -> None:
        """Nothing to do: an OpenAI-compatible server loads its model itself."""

    async def list_models(self) -> list[ModelInfo]:
        """The models the server lists at `/v1/models`."""
        listing = await get_json(self._client, "/v1/models", self._upstream)
        return [
            ModelInfo(name=item.get("id", ""), modified_at=_created(item), details={"owned_by": item.get("owned_by")})
            for item in listing.get("data", [])
        ]

    async def inventory(self, seconds: float) -> tuple[list[ModelInfo], set[str]]:
        """For the host pool: the models `/v1/models` lists, all of them loaded (such servers load what they serve)."""
        try:
            response = await self._client.get("/v1/models", timeout=seconds)
            response.raise_for_status()
            models = [
                ModelInfo(str(item.get("id")), modified_at=_created(item)) for item in response.json().get("data", [])
            ]
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


def openai_messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """Messages in OpenAI's format: images as data: URL parts, tool calls with their arguments as they came,
    tool results with the id of the call they answer."""
    out: list[dict[str, Any]] = []
    # Ollama's dialect names a result's tool, not its call (and its clients drop call ids): a result without an id
    # answers the oldest unanswered call of its tool, and a call without an id gets one from its place.
    unanswered: dict[str, list[str]] = {}
    for position, message in enumerate(messages):
        entry: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
            parts += [
                {"type": "image_url", "image_url": {
                    "url": f"data:{image.media_type};base64,{base64.b64encode(image.data).decode('ascii')}"}}
                for image in message.images
            ]  # fmt: skip
            entry["content"] = parts
        if message.tool_calls:
            calls = []
            for index, call in enumerate(message.tool_calls):
                call_id = call.id or f"call_{position}_{index}"
                unanswered.setdefault(call.name, []).append(call_id)
                calls.append({"id": call_id, "type": "function",
                              "function": {"name": call.name, "arguments": call.arguments}})  # fmt: skip
            entry["content"] = message.content or None
            entry["tool_calls"] = calls
        if message.role == "tool":
            waiting = unanswered.get(message.tool_name or "")
            answered = message.tool_call_id or (waiting[0] if waiting else None)
            if answered is not None:
                entry["tool_call_id"] = answered
                for ids in unanswered.values():
                    if answered in ids:
                        ids.remove(answered)
        out.append(entry)
    return out


def tool_call_delta(call: Any, label: str) -> ToolCallDelta:
    """One entry of a streamed `delta.tool_calls`: its index, and on its first chunk its id and name."""
    if not isinstance(call, dict):
        raise BackendError(f"{label} sent a tool call that is not an object: {str(call)[:200]}")
    function = call.get("function") or {}
    return ToolCallDelta(
        call.get("index") or 0, call.get("id") or None, function.get("name") or None, function.get("arguments") or ""
    )


def _answer_room(payload: dict[str, Any], context: int) -> int:
    """Tokens kept free for the answer: its max_tokens (at most half the context), else a quarter."""
    limit = payload.get("max_tokens")
    if type(limit) is int and limit > 0:
        return min(limit, context // 2)
    return context // _ANSWER_SHARE


def _surely_fits(payload: dict[str, Any], context: int) -> bool:
    """True when the messages fit even at one token per byte (no token is shorter), so nothing is counted."""
    room = context - _answer_room(payload, context) - _PROMPT_ALLOWANCE
    if tools := payload.get("tools"):
        room -= len(orjson.dumps(tools))
    for message in payload["messages"]:
        room -= _bytes(_content_text(message.get("content"))) + _MESSAGE_ALLOWANCE
        if calls := message.get("tool_calls"):
            room -= len(orjson.dumps(calls))
        if room < 0:
            return False
    return True


def _content_text(content: object) -> str:
    """A message's text: the string, or its text parts joined (images are the server's to count)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content if part.get("type") == "text")
    return ""


def _bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _add_options(payload: dict[str, Any], options: dict[str, Any] | None, fields: dict[str, str]) -> None:
    for option, value in (options or {}).items():
        name = fields.get(option)
        if name is None or (option == "num_predict" and value < 0):
            continue  # load-time (ignored_options names them); num_predict -1/-2 is the server's default
        payload[name] = value
    if "repeat_penalty" in payload:
        payload["repetition_penalty"] = payload["repeat_penalty"]  # vLLM's name for it; each ignores the other's


class SseFrames:
    """Cuts an OpenAI-style event stream into its JSON `data:` frames; after `[DONE]` the rest is read and dropped
    (so the connection can go back to the pool). A frame holding `error` raises BackendError.

    A plain method, not an async generator: on the per-token path every generator layer costs a suspension.
    """

    __slots__ = ("_lines", "label", "done")

    def __init__(self, label: str) -> None:
        self._lines = LineSplitter()
        self.label = label
        self.done = False

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """The frames this chunk completes."""
        frames = []
        for line in self._lines.feed(chunk):
            data = sse_data(line)
            if data is None or self.done:
                continue
            if data == b"[DONE]":
                self.done = True
                continue
            event = load_json_object(data, self.label)
            if "error" in event:
                raise BackendError(f"{self.label}: {_message(event['error'])}")
            frames.append(event)
        return frames


def ignored_options(options: dict[str, Any]) -> tuple[str, ...]:
    """The options an OpenAI-compatible server cannot take per request, sorted."""
    return tuple(sorted(option for option in options if option not in _OPTION_FIELDS))


def _short(response: httpx.Response) -> str:
    text = response.text.strip()
    try:
        body = response.json()
    except ValueError:
        return text[:200] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    return _message(error)[:200] if error is not None else text[:200]


def _message(error: object) -> str:
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


def _created(item: dict[str, Any]) -> str | None:
    """`/v1/models`' `created` (Unix seconds) in RFC 3339, as Ollama writes `modified_at`; None when absent."""
    created = item.get("created")
    if type(created) is not int or created <= 0:
        return None
    try:
        return datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None
