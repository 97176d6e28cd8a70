"""OpenAI's wire format: the request bodies of `/v1/chat/completions` and `/v1/completions`, their
translation into a `ChatInput`, and the responses and `chat.completion.chunk` stream frames."""

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app import vocabulary
from app.backends import ChatInput
from app.core.exchange import Exchange
from app.dialects.inputs import InputLimits
from app.errors import InvalidRequest, MiniVaultError
from app.schemas import INT64_MAX, INT64_MIN, NOT_BLANK, describe_validation_errors, reject_non_finite
from app.vocabulary import Event, ThinkingDelta, ToolCallDelta

S = TypeVar("S", bound="Sampling")

_CHAT_EXAMPLE = '{"model": "llama3", "messages": [{"role": "user", "content": "Hello"}]}'
_COMPLETION_EXAMPLE = '{"model": "llama3", "prompt": "Once upon a time"}'


class TextPart(BaseModel):
    """One part of a message's content; only text reaches a text model."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    # `developer` is the newer name OpenAI gives the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


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
    n: int | None = Field(None, ge=1, le=1, description="Only 1: one answer per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None

    def options(self, max_tokens: int | None) -> dict[str, Any] | None:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        options = {
            "num_predict": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": stop,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        return {name: value for name, value in options.items() if value is not None} or None

    @field_validator("max_tokens", "seed", "n", mode="before")
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


class ChatCompletionRequest(Sampling):
    """The body of `POST /v1/chat/completions`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "tinyllama:1.1b-chat", "messages": [{"role": "user", "content": "Why is the sky blue?"}]},
                {"model": "tinyllama:1.1b-chat", "stream": True, "stream_options": {"include_usage": True},
                 "max_tokens": 64, "temperature": 0.2,
                 "messages": [{"role": "system", "content": "Answer briefly."},
                              {"role": "user", "content": "Why is the sky blue?"}]},
            ]
        }
    )  # fmt: skip

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX, description="The newer name of max_tokens.")

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
            "examples": [{"model": "tinyllama:1.1b-chat", "prompt": "Once upon a time", "max_tokens": 32}]
        }
    )

    prompt: _Prompt | Annotated[list[_Prompt], Field(min_length=1, max_length=1)] = Field(
        description="One prompt, not blank; a list must hold exactly one."
    )


# Fields that would change the answer but cannot be honoured: refused with a reason rather than
# ignored, so a client does not silently get something else than it asked for.
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (bool, "tool calling is not supported by MiniVault; remove `tools`"),
    "functions": (bool, "function calling is not supported by MiniVault; remove `functions`"),
    "tool_choice": (lambda v: v not in (None, "none"), "tool calling is not supported; remove `tool_choice`"),
    "function_call": (lambda v: v not in (None, "none"), "function calling is not supported; remove `function_call`"),
    "logprobs": (lambda v: v not in (None, False, 0), "log probabilities are not supported; remove `logprobs`"),
    "top_logprobs": (lambda v: v not in (None, 0), "log probabilities are not supported; remove `top_logprobs`"),
    "logit_bias": (bool, "`logit_bias` is not supported; remove it"),
    "response_format": (
        lambda v: not (isinstance(v, dict) and v.get("type") == "text") and v is not None,
        "structured output (`response_format` other than text) is not supported; remove it",
    ),
    "audio": (lambda v: v is not None, "audio output is not supported; remove `audio`"),
    "modalities": (lambda v: v not in (None, ["text"]), 'only text output is supported; send `modalities: ["text"]`'),
    "prediction": (lambda v: v is not None, "predicted outputs are not supported; remove `prediction`"),
    "echo": (lambda v: v not in (None, False), "`echo` is not supported; remove it"),
    "suffix": (lambda v: v not in (None, ""), "`suffix` (insertion) is not supported; remove it"),
    "best_of": (lambda v: v not in (None, 1), "`best_of` must be 1: MiniVault returns one answer per request"),
}


def _validate(model: type[S], raw: bytes, example: str) -> S:
    if not raw.strip():
        raise InvalidRequest(f"the body is empty: send a JSON object like {example}")
    reject_non_finite(raw)  # pydantic would take 1e999 and NaN, also in the fields passed on as they are
    try:
        request = model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]["loc"]
        raise _invalid(describe_validation_errors(exc, example), str(first[0]) if first else None) from None
    for field, value in (request.model_extra or {}).items():
        rule = _REFUSED.get(field)
        if rule is not None and rule[0](value):
            raise _invalid(rule[1], field)
    return request


def _invalid(message: str, param: str | None) -> InvalidRequest:
    error = InvalidRequest(message)
    error.param = param
    return error


def parse_chat_request(raw: bytes, limits: InputLimits) -> tuple[ChatCompletionRequest, ChatInput]:
    """Validate a chat completion body and turn its messages into the backend's input."""
    request = _validate(ChatCompletionRequest, raw, _CHAT_EXAMPLE)
    messages = tuple(
        vocabulary.Message("system" if m.role == "developer" else m.role, _text(m.content)) for m in request.messages
    )
    _check_length(sum(len(m.content) for m in messages), limits.max_prompt_chars, "messages")
    options = request.options(request.max_completion_tokens or request.max_tokens)
    return request, ChatInput(request.model, messages, options, conversation=True)


def parse_completion_request(raw: bytes, limits: InputLimits) -> tuple[CompletionRequest, ChatInput]:
    """Validate a text completion body; its one prompt is sent as a plain prompt."""
    request = _validate(CompletionRequest, raw, _COMPLETION_EXAMPLE)
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if len(prompts) != 1:
        raise _invalid(f"prompt: send one prompt, not a list of {len(prompts)} (one answer per request)", "prompt")
    if not prompts[0].strip():
        raise _invalid("prompt: must not be blank", "prompt")
    _check_length(len(prompts[0]), limits.max_prompt_chars, "prompt")
    return request, ChatInput.single(request.model, prompts[0], None, request.options(request.max_tokens))


def _text(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _check_length(chars: int, limit: int, field: str) -> None:
    if chars > limit:
        raise _invalid(f"{field}: {chars} characters in all; the limit is {limit} (MINIVAULT_MAX_PROMPT_CHARS)", field)


def finish_reason(exchange: Exchange) -> str:
    """OpenAI's `finish_reason`: `length` when the token limit cut the answer, else `stop`."""
    return "length" if exchange.completion.done_reason == "length" else "stop"


def usage(exchange: Exchange) -> dict[str, int]:
    prompt = exchange.completion.prompt_tokens or 0
    completion = exchange.completion.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def created(exchange: Exchange) -> int:
    return int(exchange.ts.timestamp())


def chat_completion(exchange: Exchange) -> dict[str, Any]:
    """The non-streaming `chat.completion` object."""
    return {
        "id": f"chatcmpl-{exchange.id}",
        "object": "chat.completion",
        "created": created(exchange),
        "model": exchange.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": exchange.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(exchange),
            }
        ],
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
    costs one orjson call and two concatenations.
    """

    __slots__ = ("exchange", "chat", "include_usage", "head", "tail", "first")

    def __init__(self, exchange: Exchange, chat: bool, include_usage: bool) -> None:
        self.exchange = exchange
        self.chat = chat
        self.include_usage = include_usage
        self.first = True
        self.head = self.tail = b""

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
            if self.chat:
                # The first chunk also says whose message this is, as OpenAI's does.
                frame = self._with_choice(self._frame(None), text)
                frame["choices"][0]["delta"] = {"role": "assistant", "content": text}
                return b"data: " + orjson.dumps(frame) + b"\n\n"
        return self.head + orjson.dumps(text) + self.tail

    def event(self, event: ThinkingDelta | ToolCallDelta) -> bytes:
        """An event that is not text (thinking, a tool call)."""
        raise NotImplementedError(f"{type(event).__name__} is not rendered yet")

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
