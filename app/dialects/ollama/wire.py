"""Ollama's wire format: the bodies of `/api/generate` and `/api/chat`, their translation into a
`ChatInput`, and the NDJSON lines and final objects (with `done_reason` and the durations) Ollama answers."""

import hashlib
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.backends import ChatInput, ModelInfo
from app.core.exchange import Exchange
from app.dialects import inputs
from app.dialects.inputs import InputLimits, invalid
from app.errors import InvalidRequest, MiniVaultError
from app.schemas import Options, describe_validation_errors, reject_non_finite
from app.vocabulary import (
    EFFORTS,
    Event,
    Image,
    Message,
    OutputFormat,
    Think,
    ThinkingDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    json_object,
    json_text,
)

# The Ollama release whose API MiniVault answers, reported by /api/version when the backend is not
# Ollama (with Ollama, its own version is passed on).
OLLAMA_API_VERSION = "0.12.0"

B = TypeVar("B", bound="_Body")

_GENERATE_EXAMPLE = '{"model": "llama3", "prompt": "Why is the sky blue?"}'
_CHAT_EXAMPLE = '{"model": "llama3", "messages": [{"role": "user", "content": "Hello"}]}'
_TOOL_EXAMPLE = '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}'

# What /docs (and schemathesis) show of the fields the parsers check themselves: as exact as JSON Schema can say.
_NULL: dict[str, Any] = {"type": "null"}
_BASE64_REST = "(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
# Base64 whose bytes begin as a PNG, JPEG or GIF does (WebP is accepted too; its signature has a gap no short
# pattern spells).
_IMAGE = {"type": "string", "contentEncoding": "base64",
          "pattern": f"^(?:iVBORw0KGg[o-r][A-Za-z0-9+/]|/9j/|R0lGOD[dl]h){_BASE64_REST}"}  # fmt: skip
_IMAGES: dict[str, Any] = {"anyOf": [{"type": "array", "items": _IMAGE}, _NULL]}
_FUNCTION_NAME = {"type": "string", "pattern": inputs.TOOL_NAME.pattern}
_NULLABLE_TEXT = {"anyOf": [{"type": "string"}, _NULL]}
_FUNCTION = {"type": "object", "required": ["name"], "properties": {
    "name": _FUNCTION_NAME, "description": _NULLABLE_TEXT,
    "parameters": {"anyOf": [{"type": "object", "description": "A JSON schema"}, _NULL]}}}  # fmt: skip
_TOOL = {
    "type": "object",
    "required": ["function"],
    "properties": {"type": {"enum": ["function"]}, "function": _FUNCTION},
}
_TOOLS: dict[str, Any] = {"anyOf": [{"type": "array", "items": _TOOL}, _NULL]}
_CALLED = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _FUNCTION_NAME, "arguments": {"type": "object"}},
}
_CALL = {"type": "object", "required": ["function"], "properties": {"id": _NULLABLE_TEXT, "function": _CALLED}}
_TOOL_CALLS: dict[str, Any] = {"anyOf": [{"type": "array", "items": _CALL}, _NULL]}
# The worked examples' pieces: a 1x1 PNG, a tool, the call a model made of it, and a schema to answer in.
_PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
_WEATHER: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
_WEATHER_CALL: dict[str, Any] = {"id": "call_0", "function": {"index": 0, "name": "get_weather",
                                                               "arguments": {"city": "Paris"}}}  # fmt: skip
_COLOUR: dict[str, Any] = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
_UNIT = "(?:ns|us|µs|μs|ms|s|m|h)"
_NUMBER = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)"
# Go's time.ParseDuration, which Ollama reads a string keep_alive with: "0", or numbers each with a unit.
_DURATION = re.compile(rf"[-+]?(?:0|(?:{_NUMBER}{_UNIT})+)")
_DURATION_PART = re.compile(rf"({_NUMBER})({_UNIT})")


class _Body(BaseModel):
    # The fields MiniVault reads are declared; the new kinds (`format`, `think`, images, tools) are checked by
    # the parsers below, which name the field as the client spelled it (`tools[0].function.name`). Fields that
    # would change the answer but cannot be honoured are refused by name (`_REFUSED`, checked against the extras).
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, description="A model the backend has (GET /api/tags).")
    options: Options | None = Field(None, description="Ollama model options.")
    stream: bool = Field(True, description="NDJSON lines (the default), or one object with `false`.")
    keep_alive: str | int | float | None = Field(
        None, description='How long the model stays loaded after this request: seconds, or a duration like "5m"; '
        "0 unloads it (with no prompt: at once), a negative value keeps it loaded. Passed on to Ollama.",
        json_schema_extra={"anyOf": [{"type": "string", "pattern": f"^{_DURATION.pattern}$"}, {"type": "number"},
                                     _NULL]},
    )  # fmt: skip
    format: Any = Field(None, description='"json" (any JSON object), or a JSON schema the answer must match.',
                        json_schema_extra={"anyOf": [{"enum": ["json", ""]}, {"type": "object"}, _NULL]})  # fmt: skip
    think: Any = Field(None, description='Thinking: true or false, or an effort, "low", "medium" or "high".',
                       json_schema_extra={"anyOf": [{"type": "boolean"}, {"enum": list(EFFORTS)}, _NULL]})  # fmt: skip


def _images_field() -> Any:
    return Field(None, description="Base64-encoded PNG, JPEG, WebP or GIF images (within MINIVAULT_MAX_IMAGE_BYTES).",
                 json_schema_extra=_IMAGES)  # fmt: skip


class GenerateBody(_Body):
    """The body of `POST /api/generate`; no prompt (and no suffix) loads the model, as Ollama does."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "tinyllama:1.1b-chat", "prompt": "Why is the sky blue?"},
                {"model": "tinyllama:1.1b-chat", "prompt": "Why is the sky blue?", "system": "Answer briefly.",
                 "stream": False, "options": {"temperature": 0.2, "num_predict": 64}},
                {"model": "qwen2.5-coder:1.5b", "prompt": "def fib(n):\n    ", "suffix": "\n\nprint(fib(10))",
                 "options": {"temperature": 0.01, "num_predict": 128}},
                # Continue's autocomplete, on every keystroke: the prompt as it is, the text after the cursor.
                {"model": "qwen2.5-coder:1.5b", "prompt": "def fib(n):\n    ", "suffix": "\n\nprint(fib(10))",
                 "raw": True, "stream": False, "keep_alive": "30m",
                 "options": {"temperature": 0.01, "num_predict": 128, "stop": ["\n\n"]}},
                {"model": "tinyllama:1.1b-chat", "prompt": "Name a primary colour.", "format": _COLOUR,
                 "stream": False},
                {"model": "llava:7b", "prompt": "What is in this picture?", "images": [_PIXEL], "stream": False},
                {"model": "qwen3:0.6b", "prompt": "Is 97 prime?", "think": "low"},
            ],
            # A raw prompt has no template to place a system prompt in (Ollama refuses the pair too).
            "if": {"required": ["raw"], "properties": {"raw": {"const": True}}},
            "then": {"properties": {"system": {"anyOf": [{"const": ""}, _NULL]}}},
        }
    )  # fmt: skip

    prompt: str = ""
    system: str | None = None
    images: Any = _images_field()
    suffix: str | None = Field(None, description="Fill in the middle: the text after the answer (`insert` models).")
    raw: bool = Field(False, description="Send the prompt as it is, without the model's template (and its system).")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    images: Any = _images_field()
    tool_calls: Any = Field(None, description='An assistant\'s calls: [{"function": {"name", "arguments": {...}}}].',
                            json_schema_extra=_TOOL_CALLS)  # fmt: skip
    thinking: str | None = Field(None, description="An assistant's thinking, sent back with its turn.")
    tool_name: str | None = Field(None, description="On a `tool` message: the tool whose result it is.")
    tool_call_id: str | None = Field(None, description="On a `tool` message: the id of the call it answers.")


class ChatBody(_Body):
    """The body of `POST /api/chat`; no messages loads the model, as Ollama does."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "tinyllama:1.1b-chat", "messages": [{"role": "user", "content": "Why is the sky blue?"}]},
                {"model": "tinyllama:1.1b-chat", "stream": False,
                 "messages": [{"role": "system", "content": "Answer briefly."},
                              {"role": "user", "content": "Why is the sky blue?"}]},
                {"model": "llama3.1", "messages": [{"role": "user", "content": "Weather in Paris?"}],
                 "tools": [_WEATHER]},
                # The next turn: the model's call, as it came, and the tool's result.
                {"model": "llama3.1", "tools": [_WEATHER], "stream": False,
                 "messages": [{"role": "user", "content": "Weather in Paris?"},
                              {"role": "assistant", "content": "", "tool_calls": [_WEATHER_CALL]},
                              {"role": "tool", "tool_name": "get_weather", "tool_call_id": "call_0",
                               "content": "18 C and sunny"}]},
                {"model": "llava:7b", "stream": False,
                 "messages": [{"role": "user", "content": "What is in this picture?", "images": [_PIXEL]}]},
                {"model": "tinyllama:1.1b-chat", "format": _COLOUR, "stream": False,
                 "messages": [{"role": "user", "content": "Name a primary colour."}]},
                {"model": "qwen3:0.6b", "think": True, "keep_alive": "10m", "options": {"num_ctx": 8192},
                 "messages": [{"role": "user", "content": "Is 91 prime?"}]},
            ]
        }
    )  # fmt: skip

    messages: list[ChatMessage] = Field(default_factory=list)
    tools: Any = Field(None, description=f"Functions the model may call, each like {_TOOL_EXAMPLE}.",
                       json_schema_extra=_TOOLS)  # fmt: skip


def _present(value: Any) -> bool:
    return value not in (None, False, "", [], {}, 0)


_UNSUPPORTED = "is not supported by MiniVault; remove it"
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "template": (_present, f"template: a custom prompt template {_UNSUPPORTED}"),
    "context": (_present, f"context: the deprecated token context {_UNSUPPORTED}; use /api/chat with messages"),
    "logprobs": (_present, f"logprobs {_UNSUPPORTED}"),
    "top_logprobs": (_present, f"top_logprobs {_UNSUPPORTED}"),
}
# Ollama's generate has no tools (it would ignore them): say so rather than answer without them.
_REFUSED_ON_GENERATE = {
    **_REFUSED,
    "tools": (_present, "tools: /api/generate takes no tools (Ollama would ignore them); send them to /api/chat"),
}


def _validate(model: type[B], raw: bytes, example: str, refused: dict[str, tuple[Callable[[Any], bool], str]]) -> B:
    if not raw.strip():
        raise InvalidRequest(f"the body is empty: send a JSON object like {example}")
    reject_non_finite(raw)  # pydantic would take 1e999 and NaN, also in the fields passed on as they are
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_errors(exc, example)) from None
    for field, value in (body.model_extra or {}).items():
        rule = refused.get(field)
        if rule is not None and rule[0](value):
            raise InvalidRequest(rule[1])
    _keep_alive_seconds(body.keep_alive)
    return body


def _options(body: _Body) -> dict[str, Any] | None:
    return body.options.model_dump(exclude_none=True) if body.options else None


def _check_length(chars: int, limit: int, field: str) -> None:
    if chars > limit:
        raise InvalidRequest(f"{field}: {chars} characters in all; the limit is {limit} (MINIVAULT_MAX_PROMPT_CHARS)")


def parse_generate(raw: bytes, limits: InputLimits) -> tuple[GenerateBody, ChatInput | None]:
    """Validate a generate body; the ChatInput is None when there is no prompt (a request to load the model)."""
    body = _validate(GenerateBody, raw, _GENERATE_EXAMPLE, _REFUSED_ON_GENERATE)
    images = _images(body.images, "images", limits)
    answer_format, think = _format(body.format), _think(body.think)
    if body.raw and body.system:
        raise invalid("raw: a raw prompt reaches the model as it is, without the template that would place `system`; "
                      "put the system text in the prompt, or leave raw out", "raw")  # fmt: skip
    suffix = body.suffix or None
    if not body.prompt.strip() and suffix is None:
        return body, None
    _check_length(len(body.prompt), limits.max_prompt_chars, "prompt")
    if suffix is not None:
        _check_length(len(suffix), limits.max_prompt_chars, "suffix")
    chat = ChatInput.single(
        body.model, body.prompt, body.system, _options(body), images=images, format=answer_format, think=think,
        suffix=suffix, raw=body.raw, keep_alive=body.keep_alive,
    )  # fmt: skip
    return body, chat


def parse_chat(raw: bytes, limits: InputLimits) -> tuple[ChatBody, ChatInput | None]:
    """Validate a chat body; the ChatInput is None when there are no messages (a request to load the model)."""
    body = _validate(ChatBody, raw, _CHAT_EXAMPLE, _REFUSED)
    tools = _tools(body.tools)
    answer_format, think = _format(body.format), _think(body.think)
    if not body.messages:
        return body, None
    messages = []
    chars = 0
    for i, m in enumerate(body.messages):
        # A text message (nearly all of them) skips the checks of what it does not hold.
        if m.images is None and m.tool_calls is None and m.thinking is None and m.role != "tool":
            message = Message(m.role, m.content or "")
        else:
            message = _message(m, f"messages[{i}]", limits)
            chars += len(message.thinking or "") + sum(len(call.arguments) for call in message.tool_calls)
        chars += len(message.content)
        messages.append(message)
    _check_length(chars, limits.max_prompt_chars, "messages")
    chat = ChatInput(
        body.model, tuple(messages), _options(body), conversation=True, tools=tools, format=answer_format, think=think,
        keep_alive=body.keep_alive,
    )  # fmt: skip
    return body, chat


def _message(message: ChatMessage, where: str, limits: InputLimits) -> Message:
    """A message holding more than text: images, an assistant's tool calls and thinking, a tool's result.

    Calls and thinking are taken on any role, as Ollama takes them (its template decides what they mean).
    """
    role = message.role
    images = _images(message.images, f"{where}.images", limits)
    calls = () if message.tool_calls is None else _tool_calls(message.tool_calls, f"{where}.tool_calls")
    tool = role == "tool"
    return Message(
        role, message.content or "", images=images, tool_calls=calls, thinking=message.thinking or None,
        tool_call_id=message.tool_call_id if tool else None, tool_name=message.tool_name if tool else None,
    )  # fmt: skip


def _images(value: object, field: str, limits: InputLimits) -> tuple[Image, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise invalid(f"{field}: must be a list of base64-encoded images", field)
    return tuple(inputs.base64_image(image, f"{field}[{j}]", limits) for j, image in enumerate(value))


def _tools(value: object) -> tuple[Tool, ...]:
    """Ollama's `tools`, `[{"type": "function", "function": {"name", "description", "parameters"}}]`."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise invalid(f"tools: must be a list of tools, each like {_TOOL_EXAMPLE}", "tools")
    tools = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise invalid(f"{where}: must be an object like {_TOOL_EXAMPLE}", where)
        if tool.get("type", "function") != "function":
            raise invalid(f'{where}.type: must be "function", the one kind of tool Ollama has', f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{where}.function: must be an object with the function's name, description and "
                          "parameters", f"{where}.function")  # fmt: skip
        name = inputs.tool_name(function.get("name"), f"{where}.function.name")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"{where}.function.description: must be a string", f"{where}.function.description")
        parameters = function.get("parameters")
        field = f"{where}.function.parameters"
        parameters = {} if parameters is None else inputs.json_schema(parameters, field)
        tools.append(Tool(name, description, parameters))
    return tuple(tools)


def _tool_calls(value: object, where: str) -> tuple[ToolCall, ...]:
    """An assistant's `tool_calls`, `[{"id"?, "function": {"name", "arguments": {...}}}]`; the arguments are kept
    as orjson writes them (key order as sent), the text the backend passes on."""
    if not isinstance(value, list):
        raise invalid(f'{where}: must be a list of calls, each like {{"function": {{"name": "get_weather", '
                      '"arguments": {"city": "Paris"}}}', where)  # fmt: skip
    calls = []
    for k, call in enumerate(value):
        at = f"{where}[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise invalid(f"{at}.function: must be an object with the called function's name and arguments",
                          f"{at}.function")  # fmt: skip
        name = inputs.tool_name(function.get("name"), f"{at}.function.name")
        arguments = function.get("arguments", {})
        if not isinstance(arguments, dict):
            raise invalid(f"{at}.function.arguments: must be a JSON object (Ollama's arguments are an object, not "
                          "a string of JSON)", f"{at}.function.arguments")  # fmt: skip
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise invalid(f"{at}.id: must be a string", f"{at}.id")
        text = json_text(arguments)
        calls.append(ToolCall(call_id or "", name, text))
    return tuple(calls)


def _format(value: object) -> OutputFormat | None:
    if value is None or value == "":
        return None
    if value == "json":
        return OutputFormat()
    if isinstance(value, dict):
        return OutputFormat(inputs.json_schema(value, "format"))
    raise invalid('format: must be "json" (any JSON object) or a JSON schema object, like {"type": "object", '
                  '"properties": {"answer": {"type": "string"}}}', "format")  # fmt: skip


def _think(value: object) -> Think:
    if value is None or isinstance(value, bool) or value in EFFORTS:
        return value  # type: ignore[return-value]
    raise invalid(f'think: must be true, false, "low", "medium" or "high" (got {orjson.dumps(value).decode():.40})',
                  "think")  # fmt: skip


_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _keep_alive_seconds(value: str | int | float | None) -> float | None:
    """`keep_alive` in seconds as Ollama reads it (None when absent); a string that is no Go duration is a 400."""
    if value is None or not isinstance(value, str):
        return value
    if not _DURATION.fullmatch(value):
        raise invalid(f'keep_alive: must be a number of seconds or a duration like "5m", "1h30m" or "0" (got '
                      f"{value!r:.40})", "keep_alive")  # fmt: skip
    seconds = sum(float(number) * _SECONDS[unit] for number, unit in _DURATION_PART.findall(value))
    return -seconds if value.startswith("-") else seconds


def unloads(keep_alive: str | int | float | None) -> bool:
    """Whether `keep_alive` asks Ollama to unload the model (0, "0", "0s", ...)."""
    return _keep_alive_seconds(keep_alive) == 0


# The answers /docs shows (OpenAPI Example objects for a 200's `examples`): text, thinking and tool calls, each
# as one object (`stream: false`) and as NDJSON lines.
_AT = {"model": "qwen3:0.6b", "created_at": "2026-11-29T21:40:56.445Z"}
_DONE = {
    "done": True, "done_reason": "stop", "total_duration": 845400000, "prompt_eval_count": 24,
    "prompt_eval_duration": 23800000, "eval_count": 15, "eval_duration": 821600000,
}  # fmt: skip
_THOUGHT = "91 = 7 x 13, so it has a factor."


def _lines(*lines: dict[str, Any]) -> str:
    return "".join(orjson.dumps({**_AT, **line}).decode() + "\n" for line in lines)


def _said(**message: Any) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": "", **message}}


GENERATE_ANSWERS: dict[str, Any] = {
    "text": {"summary": "An answer", "value": {**_AT, "response": "Sunlight scatters off air molecules.", **_DONE}},
    "thinking": {"summary": "With `think`: the thinking beside the answer", "value": {
        **_AT, "response": "No: 91 is 7 times 13.", "thinking": _THOUGHT, **_DONE}},
}  # fmt: skip
GENERATE_LINES: dict[str, Any] = {
    "text": {"summary": "An answer", "value": _lines({"response": "Sun", "done": False}, {"response": "", **_DONE})},
    "thinking": {"summary": "With `think`: thinking lines first", "value": _lines(
        {"response": "", "thinking": _THOUGHT, "done": False}, {"response": "No.", "done": False},
        {"response": "", **_DONE})},
}  # fmt: skip
CHAT_ANSWERS: dict[str, Any] = {
    "text": {"summary": "An answer", "value": {**_AT, **_said(content="Sunlight scatters off air molecules."),
                                              **_DONE}},
    "thinking": {"summary": "With `think`: `message.thinking` beside the content", "value": {
        **_AT, **_said(content="No: 91 is 7 times 13.", thinking=_THOUGHT), **_DONE}},
    "tool_calls": {"summary": "A tool call (`tools` offered): `message.tool_calls`, the arguments an object",
                   "value": {**_AT, **_said(tool_calls=[_WEATHER_CALL]), **_DONE}},
}  # fmt: skip
CHAT_LINES: dict[str, Any] = {
    "text": {"summary": "An answer", "value": _lines({**_said(content="Sun"), "done": False}, {**_said(), **_DONE})},
    "thinking": {"summary": "With `think`: thinking lines first", "value": _lines(
        {**_said(thinking=_THOUGHT), "done": False}, {**_said(content="No."), "done": False}, {**_said(), **_DONE})},
    "tool_calls": {"summary": "A tool call: one line holding the whole call", "value": _lines(
        {**_said(tool_calls=[_WEATHER_CALL]), "done": False}, {**_said(), **_DONE})},
}  # fmt: skip


def now() -> str:
    """Ollama's `created_at`: RFC 3339 in UTC."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def loaded(model: str, chat: bool, reason: str = "load") -> dict[str, Any]:
    """What Ollama answers to a generate or chat request that only loads the model (or, `reason` "unload",
    unloads it)."""
    answer: dict[str, Any] = {"model": model, "created_at": now()}
    answer.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return {**answer, "done": True, "done_reason": reason}


def _ns(ms: float | None) -> int:
    return int((ms or 0.0) * 1_000_000)


def _call(index: int, call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
    """One of Ollama's tool calls, `{"id", "function": {"index", "name", "arguments": {...}}}`, with the model's
    argument text embedded as it came."""
    text = arguments.strip()
    if not text:
        value: Any = orjson.Fragment(b"{}")  # a call without arguments
    else:
        # Ollama's shape has room only for an object: other text is passed as a string, never altered or dropped.
        value = orjson.Fragment(text) if json_object(text) else arguments
    return {"id": call_id or f"call_{index}", "function": {"index": index, "name": name or "", "arguments": value}}


class LineStream:
    """Encodes one answer as Ollama's NDJSON: a line per token, then the final `done` line.

    The line around a token never changes within an answer, so it is encoded once. Thinking goes in lines of its
    own; a tool call's pieces are gathered and sent as one line once the call is complete, as Ollama sends calls
    whole (the next call, text, thinking or the end completes it).
    """

    __slots__ = ("exchange", "chat", "head", "tail", "_call")

    def __init__(self, exchange: Exchange, chat: bool) -> None:
        self.exchange = exchange
        self.chat = chat
        self.head = self.tail = b""
        # The tool call being gathered: [index, id, name, argument pieces].
        self._call: list[Any] | None = None

    def _text(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}} if self.chat else {"response": text}

    def token(self, event: Event) -> bytes:
        if type(event) is not str:
            return self.event(event)  # type: ignore[arg-type]
        text = event
        if not self.head:  # the first token (or the first after a tool call): encode the line around it once
            pending = self._flush()
            exchange = self.exchange
            line = {"model": exchange.model, "created_at": exchange.iso_ts, **self._text("__TOKEN__"), "done": False}
            head, _, tail = orjson.dumps(line).partition(b'"__TOKEN__"')
            self.head, self.tail = head, tail + b"\n"
            return pending + head + orjson.dumps(text) + self.tail
        return self.head + orjson.dumps(text) + self.tail

    def event(self, event: ThinkingDelta | ToolCallDelta) -> bytes:
        """An event that is not text: a line of thinking, or a piece of a tool call (its line comes once complete)."""
        if type(event) is ThinkingDelta:
            return self._flush() + self._line({"thinking": event.text})
        assert type(event) is ToolCallDelta
        call = self._call
        if call is not None and call[0] == event.index:
            if event.id:
                call[1] = event.id
            if event.name:
                call[2] = event.name
            call[3].append(event.arguments)
            return b""
        done = self._flush()
        self._call = [event.index, event.id, event.name, [event.arguments]]
        self.head = b""  # so the next text token sends this call first
        return done

    def _flush(self) -> bytes:
        """The line of the tool call being gathered, if there is one."""
        call = self._call
        if call is None:
            return b""
        self._call = None
        index, call_id, name, parts = call
        return self._line({"tool_calls": [_call(index, call_id, name, "".join(parts))]})

    def _line(self, fields: dict[str, Any]) -> bytes:
        exchange = self.exchange
        if self.chat:
            body: dict[str, Any] = {"message": {"role": "assistant", "content": "", **fields}}
        else:
            body = {"response": "", **fields}
        return orjson.dumps({"model": exchange.model, "created_at": exchange.iso_ts, **body, "done": False}) + b"\n"

    def final(self, text: str) -> dict[str, Any]:
        """The last object: the text (all of it when not streaming), why it ended, the counts and durations."""
        exchange = self.exchange
        completion = exchange.completion
        total, ttft, queue = exchange.latency_ms, exchange.ttft_ms, exchange.queue_ms
        reason = completion.done_reason or "stop"
        return {
            "model": exchange.model,
            "created_at": now(),
            **self._text(text),
            "done": True,
            # Ollama ends a turn of tool calls with "stop" (an OpenAI-compatible upstream says "tool_calls").
            "done_reason": "stop" if reason == "tool_calls" else reason,
            "total_duration": _ns(total),
            "prompt_eval_count": completion.prompt_tokens or 0,
            # From MiniVault's own clock: until the first token (less any queueing), then until the end.
            "prompt_eval_duration": _ns((ttft or 0.0) - (queue or 0.0)),
            "eval_count": completion.completion_tokens or 0,
            "eval_duration": _ns((total or 0.0) - (ttft or 0.0)),
        }

    def whole(self, exchange: Exchange) -> dict[str, Any]:
        """The answer as one object (`stream: false`): the text, and the thinking and tool calls when there are."""
        answer = self.final(exchange.text)
        thinking, calls = exchange.thinking_text, exchange.tool_calls
        if thinking is None and not calls:
            return answer
        where = answer["message"] if self.chat else answer
        if thinking is not None:
            where["thinking"] = thinking
        if calls:
            where["tool_calls"] = [_call(i, c.id, c.name, c.arguments) for i, c in enumerate(calls.calls())]
        return answer

    def end(self) -> bytes:
        return self._flush() + orjson.dumps(self.final("")) + b"\n"


def error_body(error: MiniVaultError, request_id: str) -> tuple[int, dict[str, Any]]:
    """Ollama's status and body, `{"error": "..."}`: Ollama answers a bad request with 400, not 422."""
    return (400 if error.status == 422 else error.status), {"error": error.message}


def error_line(error: MiniVaultError, request_id: str) -> bytes:
    """A failure after the stream began: Ollama's clients raise on a line holding `error`."""
    return orjson.dumps({"error": error.message}) + b"\n"


def tag(info: ModelInfo) -> dict[str, Any]:
    """One model as `/api/tags` lists it."""
    return {
        "name": info.name, "model": info.name, "modified_at": info.modified_at, "size": info.size or 0,
        "digest": model_digest(info), "details": info.details,
    }  # fmt: skip


def model_digest(info: ModelInfo) -> str:
    """A digest of the model's own, 64 hex digits as Ollama shows: sha256 of its name and size.

    Clients group models by digest (llm-ollama lists models sharing one as aliases and sends the first
    one's name), so each needs its own. The name is unique in a listing (a pool merges its hosts' by
    name) and is the GGUF file's for the embedded engine, whose size then tells a replaced file apart;
    none of it changes on a restart or with the hosts that are up (their URLs and ports are left out).
    """
    return hashlib.sha256(orjson.dumps([info.name, info.size])).hexdigest()
