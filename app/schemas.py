"""Pydantic models for what crosses the API boundary, and the request parser REST and WS share."""

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import orjson
import pydantic_core
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema

from app.dialects.inputs import InputLimits, base64_image, json_schema
from app.errors import InvalidRequest
from app.vocabulary import Image

M = TypeVar("M", bound=BaseModel)

# Ollama's integer options are Go int64s; orjson cannot encode a Python int outside this range either.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# "Has a character str.strip() keeps", spelled out: JSON Schema's `\S` (ECMA-262) disagrees with Python on
# U+001C-U+001F, U+0085 and U+FEFF, and schemathesis would send "\x1e" as a valid prompt.
NOT_BLANK = r"[^\t\n\u000b\f\r \u001c-\u001f\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
# What the schema promises of an image: base64 of a PNG, JPEG or GIF by its first bytes (WebP's size field
# defeats a fixed prefix: it is accepted all the same). The server checks the bytes themselves.
BASE64_IMAGE = (
    r"^(?:iVBORw0KGgo[A-Za-z0-9+/]|/9j/|R0lGOD[dl]h)"
    r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
)
# A 1x1 PNG, for the examples.
_PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


class Options(BaseModel):
    """Ollama's model options; each is type-checked and passed through unchanged."""

    model_config = ConfigDict(extra="forbid", strict=True)

    num_keep: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    num_predict: int | None = Field(None, ge=-2, le=INT64_MAX)
    top_k: int | None = Field(None, ge=0, le=INT64_MAX)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    repeat_last_n: int | None = Field(None, ge=-1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0)
    repeat_penalty: float | None = Field(None, ge=0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    penalize_newline: bool | None = None
    stop: list[str] | None = None
    numa: bool | None = None
    num_ctx: int | None = Field(None, gt=0, le=INT64_MAX)
    num_batch: int | None = Field(None, gt=0, le=INT64_MAX)
    num_gpu: int | None = Field(None, ge=-1, le=INT64_MAX)
    main_gpu: int | None = Field(None, ge=0, le=INT64_MAX)
    use_mmap: bool | None = None
    num_thread: int | None = Field(None, gt=0, le=INT64_MAX)
    # Older Ollama options that Open WebUI's and Continue's settings still send (Ollama takes them or ignores them).
    mirostat: int | None = Field(None, ge=0, le=2)
    mirostat_eta: float | None = Field(None, ge=0)
    mirostat_tau: float | None = Field(None, ge=0)
    tfs_z: float | None = Field(None, ge=0)
    low_vram: bool | None = None
    vocab_only: bool | None = None
    use_mlock: bool | None = None

    @field_validator(
        "num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu", "main_gpu",
        "num_thread", "mirostat", mode="before",
    )  # fmt: skip
    @classmethod
    def _integral_float(cls, value: object) -> object:
        """JSON Schema's `integer` includes 2.0; strict mode alone would refuse it."""
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class GenerateRequest(BaseModel):
    """The body of `POST /generate` and of each prompt frame on `/ws/generate`."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"prompt": "Explain gravity in one sentence."},
                {"prompt": "Why is the sky blue?", "system": "Answer briefly.",
                 "options": {"temperature": 0.2, "num_predict": 64}, "stream": True},
                {"prompt": "Name a primary colour.", "format": {"type": "object", "properties": {
                    "colour": {"type": "string"}}, "required": ["colour"]}},
                {"prompt": "What is in this picture?", "model": "llava:7b", "images": [_PIXEL]},
                {"prompt": "Is 97 prime?", "model": "qwen3:0.6b", "think": "low", "stream": True},
            ]
        },
    )  # fmt: skip

    prompt: str = Field(description="The text to complete; not blank.", json_schema_extra={"pattern": NOT_BLANK})
    model: str | None = Field(None, min_length=1, description="Defaults to OLLAMA_MODEL.")
    system: str | None = Field(None, description="System prompt for this request.")
    options: Options | None = Field(None, description="Ollama model options.")
    stream: bool = Field(False, description="Answer as Server-Sent Events (ignored on the websocket).")
    conversation_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._:\-]{1,128}$",
        description="Continue this conversation (an unknown id starts one): its earlier turns are sent along, "
        "and the answer is kept as its next turn.",
    )
    format: Literal["json"] | dict[str, Any] | None = Field(
        None, description='Structured output: `"json"` (any JSON object), or a JSON schema the answer must match.'
    )
    images: list[Annotated[str, Field(json_schema_extra={"pattern": BASE64_IMAGE})]] | None = Field(
        None,
        description="Images for the prompt, base64 (no data: prefix): PNG, JPEG, WebP or GIF within "
        "MINIVAULT_MAX_IMAGE_BYTES each; the model needs the `vision` capability.",
    )
    think: bool | Literal["low", "medium", "high"] | None = Field(
        None,
        description="Thinking: on, off, or an effort level; the model needs the `thinking` capability. The "
        "thinking comes back as `thinking` (SSE `thinking` events, websocket `thinking` frames).",
    )
    # Not a field of this API: named only so its refusal can point to the dialects that take tools.
    tools: SkipJsonSchema[Any] = Field(None, exclude=True)
    # The images, decoded and checked by parse_generate_request.
    _images: tuple[Image, ...] = PrivateAttr(default=())

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("format", mode="wrap")
    @classmethod
    def _format(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:  # one phrase instead of one per member of the union
            raise ValueError('must be "json" or a JSON schema object') from None

    @field_validator("think", mode="wrap")
    @classmethod
    def _think(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError('must be true, false, "low", "medium" or "high"') from None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("/generate takes no tools; send them to /api/chat or /v1/chat/completions")
        return value

    @property
    def decoded_images(self) -> tuple[Image, ...]:
        """The images' bytes and media types (checked when the request was parsed)."""
        return self._images

    def upstream_options(self) -> dict[str, Any] | None:
        """The options actually set, as the upstream expects them."""
        return self.options.model_dump(exclude_none=True) if self.options else None


class Usage(BaseModel):
    prompt_tokens: int | None
    completion_tokens: int | None


class Timings(BaseModel):
    total_ms: float
    ttft_ms: float | None
    queue_ms: float | None = Field(None, description="Time spent waiting for a slot (about 0 when one was free).")


class GenerateResponse(BaseModel):
    """The non-streaming answer; also the `done` SSE event and (with `type`) the WS `done` frame."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"response": "Gravity pulls masses together.", "model": "tinyllama:1.1b-chat", "id": "6dcc1b11",
                 "done_reason": "stop", "usage": {"prompt_tokens": 5, "completion_tokens": 6},
                 "timings": {"total_ms": 107.9, "ttft_ms": 24.3, "queue_ms": 0.1}},
                {"response": '{"city": "Paris", "country": "France"}', "model": "qwen3:8b", "id": "0b6f5f2e",
                 "thinking": "The capital of France is Paris; answer in the schema.", "done_reason": "stop",
                 "usage": {"prompt_tokens": 31, "completion_tokens": 40},
                 "timings": {"total_ms": 912.4, "ttft_ms": 88.0, "queue_ms": 0.1}},
            ]
        }
    )  # fmt: skip

    response: str
    thinking: str | None = Field(None, description="The model's thinking, when it thought (left out otherwise).")
    model: str
    id: str
    done_reason: str | None
    usage: Usage
    timings: Timings


class ErrorDetail(BaseModel):
    code: str
    message: str
    id: str
    retry_after: int | None = Field(
        None, description="With `busy` and `rate_limited`: seconds to wait before retrying."
    )


class ErrorBody(BaseModel):
    """Every error MiniVault returns, whatever the route."""

    error: ErrorDetail


class PullRequest(BaseModel):
    """The body of `POST /models/pull`."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{"model": "qwen2:0.5b"}]})

    model: str = Field(min_length=1, description="The model to download, e.g. tinyllama:1.1b-chat.")


# How the exchange came: MiniVault's REST, SSE or websocket API, or its OpenAI- or Ollama-compatible one.
Endpoint = Literal["rest", "sse", "ws", "openai", "ollama"]
Status = Literal["ok", "error", "cancelled"]


@dataclass(slots=True)
class LoggedError:
    code: str
    message: str


@dataclass(slots=True)
class LoggedToolCall:
    """A tool call the model made; `arguments` is its JSON text, None with MINIVAULT_LOG_PROMPTS=false."""

    id: str
    name: str
    arguments: str | None


@dataclass(slots=True)
class LoggedImage:
    """What the record keeps of an image (Image.describe()): never its bytes."""

    media_type: str
    bytes: int
    sha256: str


@dataclass(slots=True, kw_only=True)
class ExchangeRecord:
    """One line of logs/log.jsonl: a finished exchange, whatever its outcome.

    A dataclass rather than a BaseModel: orjson writes it directly (one is made per request),
    and readers validate lines against it with `read_record`. With MINIVAULT_LOG_PROMPTS=false
    the texts (prompt, system, response, thinking, tool-call arguments) are None and only their
    lengths and names are kept. Fields newer than the first log format have defaults, so old
    lines still read.
    """

    id: str
    ts: str
    endpoint: Endpoint
    client: str | None = None
    key_id: str | None = None
    conversation_id: str | None = None
    backend: str
    model: str | None = None
    prompt: str | None = None
    system: str | None = None
    options: dict[str, Any] | None = None
    response: str | None = None
    prompt_chars: int | None = None
    response_chars: int | None = None
    status: Status
    error: LoggedError | None = None
    done_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    queue_ms: float | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    # With several upstream hosts: the one that answered (or the last one tried).
    upstream: str | None = None
    # Beyond text, set only when the exchange asked or produced more than text (None otherwise, so a plain
    # exchange costs only these nulls): the tools offered (names), the output format (`"json"` or the schema),
    # the images of every message in order, the calls the model made, and its thinking (None without
    # MINIVAULT_LOG_PROMPTS, like the response; `thinking_chars` keeps its length).
    tools: list[str] | None = None
    format: str | dict[str, Any] | None = None
    images: list[LoggedImage] | None = None
    tool_calls: list[LoggedToolCall] | None = None
    thinking: str | None = None
    thinking_chars: int | None = None
    # What the backend left out: options it cannot apply per request, and messages dropped to fit the context.
    ignored_options: list[str] | None = None
    dropped_messages: int | None = None


# A refused request's texts are kept up to this many characters (1 KiB of them); `prompt_chars` keeps the true length.
REFUSED_TEXT_CHARS = 1024
# And its lists (tools, images, tool calls) up to this many items.
REFUSED_ITEMS = 32


@dataclass(slots=True, kw_only=True)
class RefusedRecord(ExchangeRecord):
    """The record of a request refused before admission (invalid, too large, over a limit): written like any
    other, but a writer whose queue is over MINIVAULT_WRITER_QUEUE_BYTES may count it instead of writing it."""


_RECORD = TypeAdapter(ExchangeRecord)


def read_record(line: bytes | str) -> ExchangeRecord:
    """Parse one log line; raises ValueError for a torn or foreign line. Fields added later may be missing."""
    return _RECORD.validate_json(line)


# Pydantic's JSON parser reads 1e999 as infinity and accepts NaN and Infinity, which are not JSON. A float
# only becomes non-finite through one of these spellings: an exponent of 3+ digits, 200+ digits in a row,
# or the literals. A body is parsed a second time only when it has one; the test costs ~2 µs per request
# and 3 ms per MB (substring searches in C, on a copy where every digit reads 0; a regex costs 5x more).
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789E-", b"000000000e+")
_LONG_RUN = b"0" * 200


def reject_non_finite(raw: bytes) -> None:
    """Raise InvalidRequest naming the field when the JSON body holds a non-finite number (1e999, NaN, Infinity)."""
    if b"NaN" not in raw and b"Infinity" not in raw:
        shape = raw.translate(_DIGITS_AS_ZERO)
        if b"0e000" not in shape and b"0e+000" not in shape and _LONG_RUN not in shape:
            return
    try:
        value = pydantic_core.from_json(raw, allow_inf_nan=True)
    except ValueError:
        return  # not JSON at all: a validator says so in its words (a pass-through body: Ollama, in its own)
    path = _non_finite_at(value)
    if path is not None:
        error = InvalidRequest(
            f"{'.'.join(map(str, path)) or 'the body'}: must be a finite number (1e999 is too large for a "
            "float, and NaN and Infinity are not JSON)"
        )
        error.param = path[0] if path and isinstance(path[0], str) else None  # OpenAI's error names the field
        raise error


def _non_finite_at(value: object) -> list[str | int] | None:
    """The path to the first non-finite float in a parsed JSON value, or None."""
    stack: list[tuple[object, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if type(item) is float:
            if not math.isfinite(item):
                return path
        elif type(item) is dict:
            stack.extend((child, [*path, key]) for key, child in reversed(item.items()))
        elif type(item) is list:
            stack.extend((child, [*path, index]) for index, child in reversed(list(enumerate(item))))
    return None


def parse_body(model: type[M], raw: bytes | str | dict[str, Any], example: str) -> M:
    """Validate a JSON body, raising InvalidRequest whose message names the field and why."""
    try:
        if isinstance(raw, dict):
            return model.model_validate(raw)
        if not raw or not str(raw).strip():
            raise InvalidRequest(f"the body is empty: send a JSON object like {example}")
        reject_non_finite(raw.encode() if isinstance(raw, str) else raw)
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_errors(exc, example)) from None


def parse_generate_request(
    raw: bytes | str | dict[str, Any], max_prompt_chars: int, max_image_bytes: int
) -> GenerateRequest:
    """Validate a generate request: the prompt length limit, and a schema `format` and the images by their bytes."""
    request = parse_body(GenerateRequest, raw, '{"prompt": "Hello"}')
    if len(request.prompt) > max_prompt_chars:
        raise InvalidRequest(
            f"prompt: is {len(request.prompt)} characters; the limit is {max_prompt_chars} (MINIVAULT_MAX_PROMPT_CHARS)"
        )
    if type(request.format) is dict:
        json_schema(request.format, "format")
        try:
            orjson.dumps(request.format)
        except TypeError:  # a number JSON allows and no upstream (nor the log) can be sent
            raise InvalidRequest("format: holds an integer beyond 64 bits; keep the schema's numbers within "
                                 "-2^63 .. 2^64-1") from None  # fmt: skip
    if request.images:
        limits = InputLimits(max_prompt_chars, max_image_bytes)
        request._images = tuple(base64_image(text, f"images[{i}]", limits) for i, text in enumerate(request.images))
    return request


_MAX_PHRASES = 20


def describe_validation_errors(exc: ValidationError, example: str = '{"prompt": "Hello"}') -> str:
    """Pydantic's errors as `field: why` phrases a person can act on (the first 20, then a count)."""
    phrases = []
    # FastAPI's RequestValidationError (query and path parameters) has the same errors, without the option.
    errors = exc.errors(include_url=False) if isinstance(exc, ValidationError) else exc.errors()
    for error in errors[:_MAX_PHRASES]:
        kind = error["type"]
        field = ".".join(str(part) for part in error["loc"])
        if kind == "json_invalid":
            reason = error.get("ctx", {}).get("error", "invalid JSON")
            phrases.append(f"the body is not valid JSON ({reason}): send an object like {example}")
        elif kind in ("model_type", "model_attributes_type") and not field:
            # Only the body itself: a nested object of the wrong type (`options: "hot"`) is named below.
            phrases.append(f"the body must be a JSON object like {example}")
        elif kind == "extra_forbidden":
            phrases.append(f"{field}: unknown field; remove it")
        elif kind == "missing":
            phrases.append(f"{field}: is required")
        else:
            phrases.append(f"{field}: {error['msg'].removeprefix('Value error, ')}")
    if len(errors) > _MAX_PHRASES:
        # A body with thousands of bad fields would otherwise get (and log) an answer larger than itself.
        phrases.append(f"and {len(errors) - _MAX_PHRASES} more problems")
    return "; ".join(phrases)
