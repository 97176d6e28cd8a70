"""OpenAI's wire format: the request bodies of `/v1/chat/completions` and `/v1/completions`, their
translation into a `ChatInput`, and the responses and `chat.completion.chunk` stream frames.

Messages, tools, `tool_choice` and `response_format` are read by hand rather than by pydantic: their errors
name the field as OpenAI's SDKs and docs spell it (`messages[0].content[1].type: ...`), with `param` set.
The pydantic models of those fields only describe them in the OpenAPI schema.
"""

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, field_validator

from app import vocabulary
from app.backends import ChatInput
from app.core.exchange import Exchange
from app.dialects.inputs import TOOL_NAME, InputLimits, data_url_image, invalid, json_schema, tool_name
from app.errors import InvalidRequest, MiniVaultError
from app.schemas import INT64_MAX, INT64_MIN, NOT_BLANK, describe_validation_errors, reject_non_finite
from app.vocabulary import Event, Image, OutputFormat, Think, ThinkingDelta, Tool, ToolCall, ToolCallDelta, ToolChoice

S = TypeVar("S", bound="Sampling")

_CHAT_EXAMPLE = '{"model": "llama3", "messages": [{"role": "user", "content": "Hello"}]}'
_COMPLETION_EXAMPLE = '{"model": "llama3", "prompt": "Once upon a time"}'
# What the schema promises of an image URL: a data: URL whose base64 starts like a PNG, JPEG, GIF or WebP
# (the server checks the bytes themselves, and never fetches an http(s) URL).
IMAGE_DATA_URL = (
    r"^data:image/(?:png|jpeg|gif|webp);base64,"
    r"(?:iVBORw0KGg[o-r][A-Za-z0-9+/]|/9j/|R0lGOD[dl]h|UklGR[g-v][A-Za-z0-9+/]{4}[159BFJNRVZdhlptx]XRUJQ)"
    r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
)
_PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
# reasoning_effort -> the thinking setting: OpenAI's lowest two levels mean no thinking.
_EFFORTS: dict[str, Think] = {"none": False, "minimal": False, "low": "low", "medium": "medium", "high": "high"}


def _as_sent(documented: Any) -> Any:
    """Keep the field's JSON as it came (it is read by hand), documented in the schema as `documented`."""
    return PlainValidator(lambda value: value, json_schema_input_type=documented)


# --- the shapes the OpenAPI schema shows (names prefixed: they share the components with other dialects) ---


_SimpleType = Literal["array", "boolean", "integer", "null", "number", "object", "string"]
_ANCHOR = r"^[A-Za-z_][-A-Za-z0-9._]*$"


def _keywords_only(schema: dict[str, Any]) -> None:
    """The keywords as the metaschema types them: `null` is not a value any of them may take (Python's None
    only stands for "absent" here), and they have no titles."""
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)
        prop.pop("title", None)
        kinds = [kind for kind in prop.pop("anyOf", ()) if kind != {"type": "null"}]
        if len(kinds) == 1:
            prop.update(kinds[0])
        elif kinds:
            prop["anyOf"] = kinds


# A subschema: any object or boolean. Typing it as this schema again would be exact, and makes schemathesis'
# coverage phase take minutes on it.
_Sub = dict[str, Any] | bool
_Count = Annotated[int, Field(ge=0)]
_Names = Annotated[list[str], Field(json_schema_extra={"uniqueItems": True})]
_Schemas = Annotated[list[_Sub], Field(min_length=1)]


class OpenAIJSONSchema(BaseModel):
    """A JSON schema object, its keywords typed as draft 2020-12's metaschema types them (others are allowed).

    For the OpenAPI schema only: the server checks a schema against its draft's whole metaschema (and takes
    drafts 04, 06, 07 and 2019-09 too, when `$schema` names them).
    """

    model_config = ConfigDict(extra="allow", json_schema_extra=_keywords_only)

    schema_: (
        Literal["https://json-schema.org/draft/2020-12/schema", "https://json-schema.org/draft/2020-12/schema#"] | None
    ) = Field(None, alias="$schema")
    id_: str | None = Field(None, alias="$id", pattern=r"^[^#]*#?$")
    ref: str | None = Field(None, alias="$ref")
    anchor: str | None = Field(None, alias="$anchor", pattern=_ANCHOR)
    dynamic_ref: str | None = Field(None, alias="$dynamicRef")
    dynamic_anchor: str | None = Field(None, alias="$dynamicAnchor", pattern=_ANCHOR)
    recursive_ref: str | None = Field(None, alias="$recursiveRef")
    recursive_anchor: str | None = Field(None, alias="$recursiveAnchor", pattern=_ANCHOR)
    vocabulary: dict[str, bool] | None = Field(None, alias="$vocabulary")
    comment: str | None = Field(None, alias="$comment")
    defs: dict[str, _Sub] | None = Field(None, alias="$defs")
    definitions: dict[str, _Sub] | None = None
    type: (
        _SimpleType | Annotated[list[_SimpleType], Field(min_length=1, json_schema_extra={"uniqueItems": True})] | None
    ) = None
    const: Any = None
    enum: list[Any] | None = None
    properties: dict[str, _Sub] | None = None
    patternProperties: dict[str, _Sub] | None = None
    dependentSchemas: dict[str, _Sub] | None = None
    dependencies: dict[str, _Sub | _Names] | None = None
    items: _Sub | None = None
    contains: _Sub | None = None
    additionalProperties: _Sub | None = None
    propertyNames: _Sub | None = None
    unevaluatedItems: _Sub | None = None
    unevaluatedProperties: _Sub | None = None
    contentSchema: _Sub | None = None
    if_: _Sub | None = Field(None, alias="if")
    then: _Sub | None = None
    else_: _Sub | None = Field(None, alias="else")
    not_: _Sub | None = Field(None, alias="not")
    prefixItems: _Schemas | None = None
    allOf: _Schemas | None = None
    anyOf: _Schemas | None = None
    oneOf: _Schemas | None = None
    multipleOf: float | None = Field(None, gt=0)
    maximum: float | None = None
    exclusiveMaximum: float | None = None
    minimum: float | None = None
    exclusiveMinimum: float | None = None
    maxLength: _Count | None = None
    minLength: _Count | None = None
    maxItems: _Count | None = None
    minItems: _Count | None = None
    maxContains: _Count | None = None
    minContains: _Count | None = None
    maxProperties: _Count | None = None
    minProperties: _Count | None = None
    uniqueItems: bool | None = None
    required: _Names | None = None
    dependentRequired: dict[str, _Names] | None = None
    pattern: str | None = None
    format: str | None = None
    contentEncoding: str | None = None
    contentMediaType: str | None = None
    title: str | None = None
    description: str | None = None
    default: Any = None
    deprecated: bool | None = None
    readOnly: bool | None = None
    writeOnly: bool | None = None
    examples: list[Any] | None = None


class _Shape(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAITextPart(_Shape):
    type: Literal["text"]
    text: str


class OpenAIImageURL(_Shape):
    url: str = Field(pattern=IMAGE_DATA_URL, description="A data: URL; MiniVault never fetches an http(s) URL.")
    detail: Literal["auto", "low", "high"] | None = None


class OpenAIImagePart(_Shape):
    type: Literal["image_url"]
    image_url: OpenAIImageURL


class OpenAIFunctionCall(_Shape):
    name: str = Field(min_length=1)
    arguments: str = Field(description="The JSON text the model produced, passed on byte for byte.")


class OpenAIToolCall(_Shape):
    id: str = Field(min_length=1)
    type: Literal["function"]
    function: OpenAIFunctionCall


class OpenAISystemMessage(_Shape):
    role: Literal["system", "developer"]
    content: str | list[OpenAITextPart]
    name: str | None = None


class OpenAIUserMessage(_Shape):
    role: Literal["user"]
    content: str | list[OpenAITextPart | OpenAIImagePart]
    name: str | None = None


class OpenAIAssistantMessage(_Shape):
    role: Literal["assistant"]
    content: str | list[OpenAITextPart] | None = None
    tool_calls: list[OpenAIToolCall] | None = None
    reasoning_content: str | None = None
    name: str | None = None


class OpenAIToolMessage(_Shape):
    role: Literal["tool"]
    tool_call_id: str = Field(min_length=1)
    content: str | list[OpenAITextPart]


OpenAIMessage = Annotated[
    OpenAISystemMessage | OpenAIUserMessage | OpenAIAssistantMessage | OpenAIToolMessage, Field(discriminator="role")
]


class OpenAIFunction(_Shape):
    name: str = Field(pattern=TOOL_NAME.pattern)
    description: str | None = None
    parameters: OpenAIJSONSchema | None = Field(None, description="A JSON schema object, passed on unchanged.")
    strict: bool | None = None


class OpenAITool(_Shape):
    type: Literal["function"]
    function: OpenAIFunction


class OpenAIFunctionName(_Shape):
    name: str = Field(pattern=TOOL_NAME.pattern)


class OpenAINamedToolChoice(_Shape):
    type: Literal["function"]
    function: OpenAIFunctionName


class OpenAIJsonSchema(_Shape):
    name: str | None = Field(None, pattern=TOOL_NAME.pattern)
    schema_: OpenAIJSONSchema | None = Field(None, alias="schema", description="A JSON schema object.")
    strict: bool | None = None
    description: str | None = None


class OpenAIPlainFormat(_Shape):
    type: Literal["text", "json_object"]


class OpenAISchemaFormat(_Shape):
    type: Literal["json_schema"]
    json_schema: OpenAIJsonSchema


OpenAIResponseFormat = Annotated[OpenAIPlainFormat | OpenAISchemaFormat, Field(discriminator="type")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share; they become the backend's (Ollama-named) options."""

    # Fields OpenAI defines that change nothing here (`user`, `metadata`, `store`, ...) and fields of
    # other OpenAI-compatible servers are ignored, as those servers do; fields that would change the
    # answer but cannot be honoured are refused by name (`_REFUSED`, checked against the extras).
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, description="A model the backend has (GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # Sampling fields of the OpenAI-compatible servers (vLLM, llama.cpp), beyond OpenAI's own.
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX, description="vLLM's and llama.cpp's; -1 or 0: off.")
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, description="llama.cpp's name; 1 is off.")
    repetition_penalty: float | None = Field(None, gt=0, description="vLLM's name for repeat_penalty.")
    n: int | None = Field(None, ge=1, le=1, description="Only 1: one answer per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def options(self, max_tokens: int | None) -> dict[str, Any] | None:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        repeat = self.repeat_penalty if self.repeat_penalty is not None else self.repetition_penalty
        options = {
            "num_predict": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": repeat,
            "seed": self.seed,
            "stop": stop,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        return {name: value for name, value in options.items() if value is not None} or None

    @field_validator("max_tokens", "seed", "n", "top_k", mode="before")
    @classmethod
    def _integral_float(cls, value: object) -> object:
        """JSON Schema's `integer` includes 2.0; strict mode alone would refuse it."""
        return int(value) if isinstance(value, float) and value.is_integer() else value

    @field_validator("n", mode="before")
    @classmethod
    def _one_answer(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            raise ValueError("must be 1: MiniVault returns one answer per request (send n requests instead)")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


_WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
_CALL: dict[str, Any] = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


class ChatCompletionRequest(Sampling):
    """The body of `POST /v1/chat/completions`."""

    model_config = ConfigDict(
        json_schema_extra={
            # A call required (or one named) needs tools to call; that a named one is among them, no schema can say.
            "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"anyOf": [
                {"const": "required"}, {"type": "object"}]}}},
            "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
            "examples": [
                {"model": "tinyllama:1.1b-chat", "messages": [{"role": "user", "content": "Why is the sky blue?"}]},
                {"model": "tinyllama:1.1b-chat", "stream": True, "stream_options": {"include_usage": True},
                 "max_tokens": 64, "temperature": 0.2,
                 "messages": [{"role": "system", "content": "Answer briefly."},
                              {"role": "user", "content": "Why is the sky blue?"}]},
                {"model": "tinyllama:1.1b-chat", "tools": [_WEATHER], "tool_choice": "auto",
                 "messages": [{"role": "user", "content": "What is the weather in Paris?"}]},
                {"model": "tinyllama:1.1b-chat", "tools": [_WEATHER], "parallel_tool_calls": False,
                 "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "stream": True,
                 "messages": [{"role": "user", "content": "And in Oslo?"}]},
                {"model": "tinyllama:1.1b-chat", "tools": [_WEATHER],
                 "messages": [{"role": "user", "content": "What is the weather in Paris?"},
                              {"role": "assistant", "content": None, "tool_calls": [_CALL]},
                              {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]},
                {"model": "tinyllama:1.1b-chat", "messages": [{"role": "user", "content": "Name a colour."}],
                 "response_format": {"type": "json_schema", "json_schema": {
                     "name": "colour", "strict": True, "schema": {
                         "type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"],
                         "additionalProperties": False}}}},
                {"model": "tinyllama:1.1b-chat", "response_format": {"type": "json_object"},
                 "messages": [{"role": "system", "content": "Answer in JSON."},
                              {"role": "user", "content": "Name a colour."}]},
                {"model": "llava:7b", "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{_PIXEL}"}}]}]},
                {"model": "qwen3:8b", "reasoning_effort": "low", "top_k": 20, "min_p": 0.05,
                 "messages": [{"role": "user", "content": "Is 91 prime?"}]},
            ]
        }
    )  # fmt: skip

    messages: Annotated[object, _as_sent(list[OpenAIMessage]), Field(json_schema_extra={"minItems": 1})]
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX, description="The newer name of max_tokens.")
    tools: Annotated[object, _as_sent(list[OpenAITool] | None)] = None
    tool_choice: Annotated[
        object, _as_sent(Literal["none", "auto", "required"] | OpenAINamedToolChoice | None),
        Field(description="A named function must be one of `tools`."),
    ] = None  # fmt: skip
    parallel_tool_calls: bool | None = None
    response_format: Annotated[object, _as_sent(OpenAIResponseFormat | None)] = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        None, description='The thinking setting: "none" and "minimal" turn it off; the thinking comes back as '
        "`reasoning_content`.",
    )  # fmt: skip

    @field_validator("max_completion_tokens", mode="before")
    @classmethod
    def _integral(cls, value: object) -> object:
        return int(value) if isinstance(value, float) and value.is_integer() else value


# Not blank, as /generate's prompt: the pattern is for the schema, the check is in parse_completion_request.
_Prompt = Annotated[str, Field(json_schema_extra={"pattern": NOT_BLANK})]


class CompletionRequest(Sampling):
    """The body of `POST /v1/completions` (the legacy text-completion endpoint)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "tinyllama:1.1b-chat", "prompt": "Once upon a time", "max_tokens": 32},
                {"model": "qwen2.5-coder:1.5b", "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))",
                 "max_tokens": 32},
            ]
        }
    )  # fmt: skip

    prompt: _Prompt | Annotated[list[_Prompt], Field(min_length=1, max_length=1)] = Field(
        description="One prompt, not blank (blank only with a `suffix`: filling in at the start); a list must hold "
        "exactly one."
    )
    suffix: str | None = Field(None, description="Fill-in-the-middle: the text after the insertion.")


def _one_of(*allowed: object) -> Callable[[Any], bool]:
    return lambda value: value not in allowed


# Fields that would change the answer but cannot be honoured: refused with a reason rather than
# ignored, so a client does not silently get something else than it asked for.
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "functions": (bool, "`functions` is OpenAI's deprecated function calling; send the functions as `tools`"),
    "function_call": (
        _one_of(None, "none"),
        "`function_call` is OpenAI's deprecated function calling; send `tool_choice`",
    ),
    "logprobs": (_one_of(None, False, 0), "log probabilities are not supported; remove `logprobs`"),
    "top_logprobs": (_one_of(None, 0), "log probabilities are not supported; remove `top_logprobs`"),
    "logit_bias": (bool, "`logit_bias` is not supported; remove it"),
    "audio": (lambda v: v is not None, "audio output is not supported; remove `audio`"),
    "modalities": (_one_of(None, ["text"]), 'only text output is supported; send `modalities: ["text"]`'),
    "prediction": (lambda v: v is not None, "predicted outputs are not supported; remove `prediction`"),
    "echo": (_one_of(None, False), "`echo` is not supported; remove it"),
    "best_of": (_one_of(None, 1), "`best_of` must be 1: MiniVault returns one answer per request"),
    # On the chat endpoint: fill-in-the-middle is /v1/completions' `suffix`.
    "suffix": (_one_of(None, ""), "`suffix` belongs to /v1/completions (fill-in-the-middle); remove it here"),
}


def _validate(model: type[S], raw: bytes, example: str) -> S:
    if not raw.strip():
        raise InvalidRequest(f"the body is empty: send a JSON object like {example}")
    reject_non_finite(raw)  # pydantic would take 1e999 and NaN, also in the fields passed on as they are
    try:
        request = model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]["loc"]
        raise invalid(describe_validation_errors(exc, example), str(first[0]) if first else None) from None
    for field, value in (request.model_extra or {}).items():
        rule = _REFUSED.get(field)
        if rule is not None and rule[0](value):
            raise invalid(rule[1], field)
    return request


def parse_chat_request(raw: bytes, limits: InputLimits) -> tuple[ChatCompletionRequest, ChatInput]:
    """Validate a chat completion body and turn it into the backend's input."""
    request = _validate(ChatCompletionRequest, raw, _CHAT_EXAMPLE)
    messages = _messages(request.messages, limits)
    chars = sum(len(m.content) for m in messages)
    chars += sum(len(call.arguments) for m in messages if m.tool_calls for call in m.tool_calls)
    _check_length(chars, limits.max_prompt_chars, "messages")
    options = request.options(request.max_completion_tokens or request.max_tokens)
    if (request.tools is None and request.tool_choice is None and request.response_format is None
            and request.reasoning_effort is None and request.parallel_tool_calls is None):  # fmt: skip
        return request, ChatInput(request.model, messages, options, conversation=True)  # text only: the fast path
    tools = _tools(request.tools)
    return request, ChatInput(
        request.model,
        messages,
        options,
        conversation=True,
        tools=tools,
        tool_choice=_tool_choice(request.tool_choice, tools),
        parallel_tool_calls=request.parallel_tool_calls,
        format=_output_format(request.response_format),
        think=None if request.reasoning_effort is None else _EFFORTS[request.reasoning_effort],
    )


def parse_completion_request(raw: bytes, limits: InputLimits) -> tuple[CompletionRequest, ChatInput]:
    """Validate a text completion body; its one prompt is sent as a plain prompt (with `suffix`, to fill in)."""
    request = _validate(CompletionRequest, raw, _COMPLETION_EXAMPLE)
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if len(prompts) != 1:
        raise invalid(f"prompt: send one prompt, not a list of {len(prompts)} (one answer per request)", "prompt")
    suffix = request.suffix or None
    # Filling in at the very start of a file has an empty prefix: only then may the prompt be blank.
    if not prompts[0].strip() and suffix is None:
        raise invalid("prompt: must not be blank", "prompt")
    _check_length(len(prompts[0]) + len(suffix or ""), limits.max_prompt_chars, "prompt")
    options = request.options(request.max_tokens)
    return request, ChatInput.single(request.model, prompts[0], None, options, suffix=suffix)


# --- messages, tools, tool_choice, response_format: read by hand, each error naming its field -------------


# A tuple, not a set: `in` compares, where a set would hash (and a role sent as an object is unhashable).
_TEXT_ROLES = ("system", "user", "assistant")


def _messages(raw: object, limits: InputLimits) -> tuple[vocabulary.Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise invalid(
            'messages: must be a non-empty array of messages, like [{"role": "user", "content": "Hello"}]', "messages"
        )
    messages: list[vocabulary.Message] = []
    # A tool result names only the call it answers; the call's tool name travels beside it (Ollama wants it).
    called: dict[str, str] = {}
    for index, message in enumerate(raw):
        if type(message) is dict:
            role, content = message.get("role"), message.get("content")
            # A message of text alone, the common case, without the rest of the checks.
            if type(content) is str and role in _TEXT_ROLES and len(message) == 2:
                messages.append(vocabulary.Message(role, content))
                continue
        messages.append(_message(message, f"messages[{index}]", limits, called))
    return tuple(messages)


def _message(raw: object, field: str, limits: InputLimits, called: dict[str, str]) -> vocabulary.Message:
    if not isinstance(raw, dict):
        raise invalid(f'{field}: must be an object like {{"role": "user", "content": "Hello"}}', field)
    role = raw.get("role")
    name = raw.get("name")
    if name is not None and role != "tool" and not isinstance(name, str):
        raise invalid(f"{field}.name: must be a string (got {_shown(name)})", f"{field}.name")
    if role == "system" or role == "developer":  # `developer` is the newer name OpenAI gives the system role
        return vocabulary.Message("system", _content(raw, field)[0])
    if role == "user":
        text, images = _content(raw, field, limits)
        return vocabulary.Message("user", text, images)
    if role == "assistant":
        if raw.get("function_call") is not None:
            raise invalid(f"{field}.function_call: OpenAI's deprecated function calling; send `tool_calls`",
                          f"{field}.function_call")  # fmt: skip
        text = _content(raw, field, optional=True)[0]
        calls = _assistant_calls(raw.get("tool_calls"), f"{field}.tool_calls")
        called.update((call.id, call.name) for call in calls)
        thinking = raw.get("reasoning_content")
        if thinking is not None and not isinstance(thinking, str):
            raise invalid(f"{field}.reasoning_content: must be a string, the thinking this turn came with",
                          f"{field}.reasoning_content")  # fmt: skip
        return vocabulary.Message("assistant", text, tool_calls=calls, thinking=thinking)
    if role == "tool":
        call_id = raw.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"{field}.tool_call_id: is required: the id of the tool call this result answers",
                          f"{field}.tool_call_id")  # fmt: skip
        text = _content(raw, field)[0]
        return vocabulary.Message("tool", text, tool_call_id=call_id, tool_name=called.get(call_id))
    if role == "function":
        raise invalid(f'{field}.role: "function" messages are OpenAI\'s deprecated function calling; send role '
                      '"tool" with the tool_call_id of the call it answers', f"{field}.role")  # fmt: skip
    raise invalid(f'{field}.role: must be "system", "developer", "user", "assistant" or "tool" (got {_shown(role)})',
                  f"{field}.role")  # fmt: skip


def _content(
    raw: dict[str, Any], field: str, limits: InputLimits | None = None, optional: bool = False
) -> tuple[str, tuple[Image, ...]]:
    """A message's text and (with `limits`: user messages) images, from a string or an array of parts."""
    content = raw.get("content")
    if isinstance(content, str):
        return content, ()
    where = f"{field}.content"
    if content is None:
        if optional:
            return "", ()
        raise invalid(f"{where}: is required: a string, or an array of content parts", where)
    if not isinstance(content, list):
        raise invalid(f"{where}: must be a string or an array of content parts (got {_shown(content)})", where)
    texts: list[str] = []
    images: list[Image] = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        if not isinstance(part, dict):
            raise invalid(f'{at}: must be an object like {{"type": "text", "text": "Hello"}}', at)
        kind = part.get("type")
        if kind == "text":
            texts.append(_string(part.get("text"), f"{at}.text"))
        elif kind == "image_url" and limits is not None:
            image_url = part.get("image_url")
            if not isinstance(image_url, dict):
                raise invalid(f'{at}.image_url: must be an object like {{"url": "data:image/png;base64,..."}}',
                              f"{at}.image_url")  # fmt: skip
            if image_url.get("detail") not in (None, "auto", "low", "high"):
                raise invalid(f'{at}.image_url.detail: must be "auto", "low" or "high" (got '
                              f"{_shown(image_url.get('detail'))})", f"{at}.image_url.detail")  # fmt: skip
            images.append(data_url_image(image_url.get("url"), f"{at}.image_url.url", limits))
        elif kind == "refusal" and optional:  # an assistant's earlier refusal, sent back as its text
            texts.append(_string(part.get("refusal"), f"{at}.refusal"))
        else:
            allowed = '"text" or "image_url"' if limits is not None else '"text"'
            raise invalid(f"{at}.type: {_shown(kind)} parts are not supported in a {raw.get('role')} message; "
                          f"send {allowed} parts", f"{at}.type")  # fmt: skip
    return "".join(texts), tuple(images)


def _assistant_calls(raw: object, field: str) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid(f"{field}: must be an array of tool calls, as the assistant's answer gave them", field)
    calls = []
    for index, call in enumerate(raw):
        at = f"{field}[{index}]"
        if not isinstance(call, dict):
            raise invalid(f'{at}: must be an object like {{"id": "call_1", "type": "function", "function": '
                          '{"name": "get_weather", "arguments": "{}"}}', at)  # fmt: skip
        if call.get("type") != "function":
            raise invalid(f'{at}.type: must be "function" (got {_shown(call.get("type"))})', f"{at}.type")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise invalid(f"{at}.id: is required: the id the tool call came with", f"{at}.id")
        function = call.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{at}.function: must be an object with the name and arguments", f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"{at}.function.name: is required: the name of the tool called", f"{at}.function.name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise invalid(f"{at}.function.arguments: must be a string: the JSON text the model produced, sent back "
                          "as it came", f"{at}.function.arguments")  # fmt: skip
        calls.append(ToolCall(call_id, name, arguments))
    return tuple(calls)


def _tools(raw: object) -> tuple[Tool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise invalid('tools: must be an array of {"type": "function", "function": {"name", "parameters"}}', "tools")
    tools = []
    for index, spec in enumerate(raw):
        at = f"tools[{index}]"
        if not isinstance(spec, dict):
            raise invalid(f'{at}: must be an object like {{"type": "function", "function": {{"name": "get_weather", '
                          '"parameters": {"type": "object", "properties": {}}}}', at)  # fmt: skip
        if spec.get("type") != "function":
            raise invalid(f'{at}.type: must be "function", the one kind of tool a model here can call (got '
                          f"{_shown(spec.get('type'))})", f"{at}.type")  # fmt: skip
        function = spec.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{at}.function: must be an object with the function's name, description and parameters",
                          f"{at}.function")  # fmt: skip
        name = tool_name(function.get("name"), f"{at}.function.name")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"{at}.function.description: must be a string", f"{at}.function.description")
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid(f"{at}.function.strict: must be true or false", f"{at}.function.strict")
        parameters = function.get("parameters")
        # No parameters: a function that takes none, as OpenAI reads it.
        schema = {"type": "object", "properties": {}} if parameters is None else json_schema(
            parameters, f"{at}.function.parameters"
        )  # fmt: skip
        tools.append(Tool(name, description, schema))
    return tuple(tools)


def _tool_choice(raw: object, tools: tuple[Tool, ...]) -> ToolChoice | None:
    if raw is None:
        return None
    if raw == "none" or raw == "auto" or raw == "required":
        if raw == "required" and not tools:
            raise invalid('tool_choice: "required" asks for a tool call, and `tools` offers none', "tool_choice")
        return ToolChoice(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        function = raw.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise invalid("tool_choice.function.name: is required: the name of the tool to call", "tool_choice")
        offered = [tool.name for tool in tools]
        if name not in offered:
            raise invalid(f"tool_choice.function.name: {_shown(name)} is not one of the tools offered "
                          f"({', '.join(offered) or 'none'}); name one of them, or add it to `tools`",
                          "tool_choice")  # fmt: skip
        return ToolChoice("function", name)
    raise invalid('tool_choice: must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
                  f" (got {_shown(raw)})", "tool_choice")  # fmt: skip


def _output_format(raw: object) -> OutputFormat | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise invalid('response_format: must be an object like {"type": "json_object"}', "response_format")
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat()
    if kind != "json_schema":
        raise invalid(f'response_format.type: must be "text", "json_object" or "json_schema" (got {_shown(kind)})',
                      "response_format.type")  # fmt: skip
    spec = raw.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid('response_format.json_schema: must be an object like {"name": "answer", "schema": {...}}',
                      "response_format.json_schema")  # fmt: skip
    name = spec.get("name")
    if name is not None:
        tool_name(name, "response_format.json_schema.name")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid("response_format.json_schema.strict: must be true or false", "response_format.json_schema.strict")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid("response_format.json_schema.description: must be a string",
                      "response_format.json_schema.description")  # fmt: skip
    schema = spec.get("schema")
    # No schema: any JSON object, as OpenAI reads it.
    checked = None if schema is None else json_schema(schema, "response_format.json_schema.schema")
    return OutputFormat(checked, name, strict)


def _string(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise invalid(f"{field}: must be a string (got {_shown(value)})", field)
    return value


def _shown(value: object) -> str:
    """A value as JSON, cut short: what an error message quotes of the client's input."""
    text = orjson.dumps(value, default=str).decode()
    return text if len(text) <= 60 else f"{text[:57]}..."


def _check_length(chars: int, limit: int, field: str) -> None:
    if chars > limit:
        raise invalid(f"{field}: {chars} characters in all; the limit is {limit} (MINIVAULT_MAX_PROMPT_CHARS)", field)


# --- answers --------------------------------------------------------------------------------------------


def finish_reason(exchange: Exchange) -> str:
    """OpenAI's `finish_reason`: `tool_calls` when the model called tools, `length` when the token limit cut
    the answer, else `stop`."""
    if exchange.tool_calls:
        return "tool_calls"
    return "length" if exchange.completion.done_reason == "length" else "stop"


def usage(exchange: Exchange) -> dict[str, int]:
    prompt = exchange.completion.prompt_tokens or 0
    completion = exchange.completion.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def created(exchange: Exchange) -> int:
    return int(exchange.ts.timestamp())


def call_id_prefix(exchange: Exchange) -> str:
    """What names a tool call whose backend gave it no id: `call_<request id>`, then `_<index>`."""
    return f"call_{exchange.id}"


def chat_completion(exchange: Exchange) -> dict[str, Any]:
    """The non-streaming `chat.completion` object."""
    message: dict[str, Any] = {"role": "assistant", "content": exchange.text or None, "refusal": None}
    thinking = exchange.thinking_text
    if thinking is not None:
        message["reasoning_content"] = thinking
    if exchange.tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in exchange.tool_calls.calls(call_id_prefix(exchange))
        ]
    return {
        "id": f"chatcmpl-{exchange.id}",
        "object": "chat.completion",
        "created": created(exchange),
        "model": exchange.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(exchange)}],
        "usage": usage(exchange),
        "system_fingerprint": None,
    }


def text_completion(exchange: Exchange) -> dict[str, Any]:
    """The non-streaming `text_completion` object."""
    return {
        "id": f"cmpl-{exchange.id}",
        "object": "text_completion",
        "created": created(exchange),
        "model": exchange.model,
        "choices": [{"text": exchange.text, "index": 0, "logprobs": None, "finish_reason": finish_reason(exchange)}],
        "usage": usage(exchange),
    }


class ChunkStream:
    """Encodes one answer as OpenAI's stream: a `data:` frame per token, the finishing frame, the usage
    frame when asked for, then `data: [DONE]`.

    The frame around a token never changes within an answer, so it is encoded once and each token
    costs one orjson call and two concatenations; a thinking or tool-call delta costs the same.
    """

    __slots__ = (
        "exchange", "chat", "include_usage", "head", "tail", "first", "announced", "around", "calls", "fragments",
    )  # fmt: skip

    def __init__(self, exchange: Exchange, chat: bool, include_usage: bool) -> None:
        self.exchange = exchange
        self.chat = chat
        self.include_usage = include_usage
        self.first = True
        # Whether a chunk has said whose message this is (OpenAI's first chunk does).
        self.announced = False
        self.head = self.tail = b""
        # The frame around any delta, for the events that are not text.
        self.around: tuple[bytes, bytes] | None = None
        self.calls: set[int] = set()
        # Per call: the frame around an argument fragment, encoded once (a call streams many of them).
        self.fragments: dict[int, tuple[bytes, bytes]] = {}

    def _frame(self, choices: list[dict[str, Any]] | None) -> dict[str, Any]:
        exchange = self.exchange
        prefix, kind = ("chatcmpl", "chat.completion.chunk") if self.chat else ("cmpl", "text_completion")
        frame: dict[str, Any] = {
            "id": f"{prefix}-{exchange.id}", "object": kind, "created": created(exchange), "model": exchange.model,
        }  # fmt: skip
        if choices is not None:
            frame["choices"] = choices
        return frame

    def _with_choice(self, frame: dict[str, Any], text: str, finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta = {"content": text} if finish is None else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return {**frame, "choices": [choice]}

    def token(self, event: Event) -> bytes:
        if type(event) is not str:
            return self.event(event)  # type: ignore[arg-type]
        text = event
        if self.first:
            self.first = False
            # The frame with a placeholder, split around it: what goes before and after each later token.
            whole = orjson.dumps(self._with_choice(self._frame(None), "__TOKEN__"))
            head, _, tail = whole.partition(b'"__TOKEN__"')
            self.head, self.tail = b"data: " + head, tail + b"\n\n"
            if self.chat and not self.announced:
                self.announced = True
                frame = self._with_choice(self._frame(None), text)
                frame["choices"][0]["delta"] = {"role": "assistant", "content": text}
                return b"data: " + orjson.dumps(frame) + b"\n\n"
        return self.head + orjson.dumps(text) + self.tail

    def event(self, event: ThinkingDelta | ToolCallDelta) -> bytes:
        """A thinking delta as `delta.reasoning_content`; a tool-call delta as `delta.tool_calls`, whose first
        chunk for a call carries its id, type and name, and later ones argument fragments only."""
        if not self.chat:
            return b""  # a text completion has no place for thinking (and no tools to call)
        delta: dict[str, Any]
        if type(event) is ThinkingDelta:
            delta = {"reasoning_content": event.text}
        else:
            call: ToolCallDelta = event  # type: ignore[assignment]
            if call.index in self.calls:
                if not (call.id or call.name) and self.announced:
                    return self._fragment(call)
                delta = {"tool_calls": [{"index": call.index, "function": {"arguments": call.arguments}}]}
            else:
                self.calls.add(call.index)
                delta = {"tool_calls": [{
                    "index": call.index, "id": call.id or f"{call_id_prefix(self.exchange)}_{call.index}",
                    "type": "function", "function": {"name": call.name or "", "arguments": call.arguments},
                }]}  # fmt: skip
        if not self.announced:
            self.announced = True
            delta = {"role": "assistant", **delta}
        around = self.around
        if around is None:
            whole = orjson.dumps(self._frame([{"index": 0, "delta": "__DELTA__", "logprobs": None,
                                               "finish_reason": None}]))  # fmt: skip
            head, _, tail = whole.partition(b'"__DELTA__"')
            around = self.around = (b"data: " + head, tail + b"\n\n")
        return around[0] + orjson.dumps(delta) + around[1]

    def _fragment(self, call: ToolCallDelta) -> bytes:
        """A fragment of a call's arguments: like a text token, the frame around it is encoded once per call."""
        around = self.fragments.get(call.index)
        if around is None:
            delta = {"tool_calls": [{"index": call.index, "function": {"arguments": "__ARGUMENTS__"}}]}
            whole = orjson.dumps(self._frame([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]))
            head, _, tail = whole.partition(b'"__ARGUMENTS__"')
            around = self.fragments[call.index] = (b"data: " + head, tail + b"\n\n")
        return around[0] + orjson.dumps(call.arguments) + around[1]

    def end(self) -> bytes:
        frames = [self._with_choice(self._frame(None), "", finish_reason(self.exchange))]
        if self.include_usage:
            frames.append({**self._frame([]), "usage": usage(self.exchange)})
        return b"".join(b"data: " + orjson.dumps(frame) + b"\n\n" for frame in frames) + b"data: [DONE]\n\n"


def error_body(error: MiniVaultError, request_id: str) -> tuple[int, dict[str, Any]]:
    """OpenAI's error body, `{"error": {"message", "type", "code", "param"}}`; the status stays MiniVault's."""
    if error.status == 401:
        kind = "authentication_error"
    elif error.status == 429:
        kind = "rate_limit_error"
    elif error.status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return error.status, {"error": {"message": error.message, "type": kind, "code": error.code, "param": error.param}}


def error_frame(error: MiniVaultError, request_id: str) -> bytes:
    """A failure after the stream began: OpenAI's SDKs raise on a `data:` frame holding `error`."""
    return b"data: " + orjson.dumps(error_body(error, request_id)[1]) + b"\n\n"


def timestamp(moment: str | None) -> int:
    """Unix seconds of an ISO 8601 time (Ollama's `modified_at`), 0 when unknown."""
    if not moment:
        return 0
    try:
        # Ollama writes nanoseconds; fromisoformat takes at most microseconds.
        return int(datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", moment)).timestamp())
    except ValueError:
        return 0
