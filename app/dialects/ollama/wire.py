"""Ollama's wire format: the bodies of `/api/generate` and `/api/chat`, their translation into a
`ChatInput`, and the NDJSON lines and final objects (with `done_reason` and the durations) Ollama answers."""

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.backends import ChatInput, ModelInfo
from app.core.exchange import Exchange
from app.dialects.inputs import InputLimits
from app.errors import InvalidRequest, MiniVaultError
from app.schemas import Options, describe_validation_errors, reject_non_finite
from app.vocabulary import Event, Message, ThinkingDelta, ToolCallDelta

# The Ollama release whose API MiniVault answers, reported by /api/version when the backend is not
# Ollama (with Ollama, its own version is passed on).
OLLAMA_API_VERSION = "0.12.0"

B = TypeVar("B", bound="_Body")

_GENERATE_EXAMPLE = '{"model": "llama3", "prompt": "Why is the sky blue?"}'
_CHAT_EXAMPLE = '{"model": "llama3", "messages": [{"role": "user", "content": "Hello"}]}'


class _Body(BaseModel):
    # Fields that change nothing here (`keep_alive`: the backend keeps its own models loaded) are
    # accepted; fields that would change the answer but cannot be honoured are refused by name
    # (`_REFUSED`, checked against the extras).
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, description="A model the backend has (GET /api/tags).")
    options: Options | None = Field(None, description="Ollama model options.")
    stream: bool = Field(True, description="NDJSON lines (the default), or one object with `false`.")
    keep_alive: str | int | float | None = Field(None, description="Accepted and ignored.")


class GenerateBody(_Body):
    """The body of `POST /api/generate`; no prompt loads the model, as Ollama does."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "tinyllama:1.1b-chat", "prompt": "Why is the sky blue?"},
                {"model": "tinyllama:1.1b-chat", "prompt": "Why is the sky blue?", "system": "Answer briefly.",
                 "stream": False, "options": {"temperature": 0.2, "num_predict": 64}},
            ]
        }
    )  # fmt: skip

    prompt: str = ""
    system: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = ""

    @field_validator("role", mode="before")
    @classmethod
    def _no_tools(cls, value: object) -> object:
        if value == "tool":
            raise ValueError("the `tool` role is not supported (no tool calling); remove the message")
        return value


class ChatBody(_Body):
    """The body of `POST /api/chat`; no messages loads the model, as Ollama does."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "tinyllama:1.1b-chat", "messages": [{"role": "user", "content": "Why is the sky blue?"}]},
                {"model": "tinyllama:1.1b-chat", "stream": False,
                 "messages": [{"role": "system", "content": "Answer briefly."},
                              {"role": "user", "content": "Why is the sky blue?"}]},
            ]
        }
    )  # fmt: skip

    messages: list[ChatMessage] = Field(default_factory=list)


def _present(value: Any) -> bool:
    return value not in (None, False, "", [], {}, 0)


_UNSUPPORTED = "is not supported by MiniVault; remove it"
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (_present, f"format (structured output) {_UNSUPPORTED}"),
    "images": (_present, f"images: image input {_UNSUPPORTED}"),
    "tools": (_present, f"tools: tool calling {_UNSUPPORTED}"),
    "suffix": (_present, f"suffix (fill in the middle) {_UNSUPPORTED}"),
    "template": (_present, f"template: a custom prompt template {_UNSUPPORTED}"),
    "context": (_present, f"context: the deprecated token context {_UNSUPPORTED}; use /api/chat with messages"),
    "raw": (_present, f"raw: prompts without the model's template {_UNSUPPORTED}"),
    "think": (_present, f"think: thinking output {_UNSUPPORTED}"),
    "logprobs": (_present, f"logprobs {_UNSUPPORTED}"),
    "top_logprobs": (_present, f"top_logprobs {_UNSUPPORTED}"),
}
_REFUSED_IN_MESSAGES = {
    "images": "messages: image input is not supported by MiniVault; remove `images`",
    "tool_calls": "messages: tool calls are not supported by MiniVault; remove `tool_calls`",
}


def _validate(model: type[B], raw: bytes, example: str) -> B:
    if not raw.strip():
        raise InvalidRequest(f"the body is empty: send a JSON object like {example}")
    reject_non_finite(raw)  # pydantic would take 1e999 and NaN, also in the fields passed on as they are
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_errors(exc, example)) from None
    for field, value in (body.model_extra or {}).items():
        rule = _REFUSED.get(field)
        if rule is not None and rule[0](value):
            raise InvalidRequest(rule[1])
    for message in getattr(body, "messages", ()):
        for field, value in (message.model_extra or {}).items():
            if field in _REFUSED_IN_MESSAGES and _present(value):
                raise InvalidRequest(_REFUSED_IN_MESSAGES[field])
    return body


def _options(body: _Body) -> dict[str, Any] | None:
    return body.options.model_dump(exclude_none=True) if body.options else None


def _check_length(chars: int, limit: int, field: str) -> None:
    if chars > limit:
        raise InvalidRequest(f"{field}: {chars} characters in all; the limit is {limit} (MINIVAULT_MAX_PROMPT_CHARS)")


def parse_generate(raw: bytes, limits: InputLimits) -> tuple[GenerateBody, ChatInput | None]:
    """Validate a generate body; the ChatInput is None when there is no prompt (a request to load the model)."""
    body = _validate(GenerateBody, raw, _GENERATE_EXAMPLE)
    if not body.prompt.strip():
        return body, None
    _check_length(len(body.prompt), limits.max_prompt_chars, "prompt")
    return body, ChatInput.single(body.model, body.prompt, body.system, _options(body))


def parse_chat(raw: bytes, limits: InputLimits) -> tuple[ChatBody, ChatInput | None]:
    """Validate a chat body; the ChatInput is None when there are no messages (a request to load the model)."""
    body = _validate(ChatBody, raw, _CHAT_EXAMPLE)
    if not body.messages:
        return body, None
    messages = tuple(Message(m.role, m.content) for m in body.messages)
    _check_length(sum(len(m.content) for m in messages), limits.max_prompt_chars, "messages")
    return body, ChatInput(body.model, messages, _options(body), conversation=True)


def now() -> str:
    """Ollama's `created_at`: RFC 3339 in UTC."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def loaded(model: str, chat: bool) -> dict[str, Any]:
    """What Ollama answers to a generate or chat request that only loads the model."""
    answer: dict[str, Any] = {"model": model, "created_at": now()}
    answer.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return {**answer, "done": True, "done_reason": "load"}


def _ns(ms: float | None) -> int:
    return int((ms or 0.0) * 1_000_000)


class LineStream:
    """Encodes one answer as Ollama's NDJSON: a line per token, then the final `done` line.

    The line around a token never changes within an answer, so it is encoded once.
    """

    __slots__ = ("exchange", "chat", "head", "tail")

    def __init__(self, exchange: Exchange, chat: bool) -> None:
        self.exchange = exchange
        self.chat = chat
        self.head = self.tail = b""

    def _text(self, text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}} if self.chat else {"response": text}

    def token(self, event: Event) -> bytes:
        if type(event) is not str:
            return self.event(event)  # type: ignore[arg-type]
        text = event
        if not self.head:  # the first token: encode the line around it once
            exchange = self.exchange
            line = {"model": exchange.model, "created_at": exchange.iso_ts, **self._text("__TOKEN__"), "done": False}
            head, _, tail = orjson.dumps(line).partition(b'"__TOKEN__"')
            self.head, self.tail = head, tail + b"\n"
        return self.head + orjson.dumps(text) + self.tail

    def final(self, text: str) -> dict[str, Any]:
        """The last object: the text (all of it when not streaming), why it ended, the counts and durations."""
        exchange = self.exchange
        completion = exchange.completion
        total, ttft, queue = exchange.latency_ms, exchange.ttft_ms, exchange.queue_ms
        return {
            "model": exchange.model,
            "created_at": now(),
            **self._text(text),
            "done": True,
            "done_reason": completion.done_reason or "stop",
            "total_duration": _ns(total),
            "prompt_eval_count": completion.prompt_tokens or 0,
            # From MiniVault's own clock: until the first token (less any queueing), then until the end.
            "prompt_eval_duration": _ns((ttft or 0.0) - (queue or 0.0)),
            "eval_count": completion.completion_tokens or 0,
            "eval_duration": _ns((total or 0.0) - (ttft or 0.0)),
        }

    def whole(self, exchange: Exchange) -> dict[str, Any]:
        return self.final(exchange.text)

    def event(self, event: ThinkingDelta | ToolCallDelta) -> bytes:
        """An event that is not text (thinking, a tool call)."""
        raise NotImplementedError(f"{type(event).__name__} is not rendered yet")

    def end(self) -> bytes:
        return orjson.dumps(self.final("")) + b"\n"


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
