"""Pydantic models for what crosses the API boundary, and the request parser REST and WS share."""

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


class Options(BaseModel):
    """Ollama's model options; each is type-checked and passed through unchanged."""

    model_config = ConfigDict(extra="forbid", strict=True)

    num_keep: int | None = None
    seed: int | None = None
    num_predict: int | None = Field(None, ge=-2)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    repeat_last_n: int | None = Field(None, ge=-1)
    temperature: float | None = Field(None, ge=0)
    repeat_penalty: float | None = Field(None, ge=0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    penalize_newline: bool | None = None
    stop: list[str] | None = None
    numa: bool | None = None
    num_ctx: int | None = Field(None, gt=0)
    num_batch: int | None = Field(None, gt=0)
    num_gpu: int | None = Field(None, ge=-1)
    main_gpu: int | None = Field(None, ge=0)
    use_mmap: bool | None = None
    num_thread: int | None = Field(None, gt=0)


class GenerateRequest(BaseModel):
    """The body of `POST /generate` and of each prompt frame on `/ws/generate`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="The text to complete; not blank.")
    model: str | None = Field(None, min_length=1, description="Defaults to OLLAMA_MODEL.")
    system: str | None = Field(None, description="System prompt for this request.")
    options: Options | None = Field(None, description="Ollama model options.")
    stream: bool = Field(False, description="Answer as Server-Sent Events (ignored on the websocket).")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    def upstream_options(self) -> dict[str, Any] | None:
        """The options actually set, as the upstream expects them."""
        return self.options.model_dump(exclude_none=True) if self.options else None


class Usage(BaseModel):
    prompt_tokens: int | None
    completion_tokens: int | None


class Timings(BaseModel):
    total_ms: float
    ttft_ms: float | None


class GenerateResponse(BaseModel):
    """The non-streaming answer; also the `done` SSE event and (with `type`) the WS `done` frame."""

    response: str
    model: str
    id: str
    done_reason: str | None
    usage: Usage
    timings: Timings


class ErrorDetail(BaseModel):
    code: str
    message: str
    id: str


class ErrorBody(BaseModel):
    """Every error MiniVault returns, whatever the route."""

    error: ErrorDetail


class PullRequest(BaseModel):
    """The body of `POST /models/pull`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, description="The model to download, e.g. tinyllama:1.1b-chat.")


def parse_body(model: type[M], raw: bytes | str | dict[str, Any], example: str) -> M:
    """Validate a JSON body, raising InvalidRequest whose message names the field and why."""
    try:
        if isinstance(raw, dict):
            return model.model_validate(raw)
        if not raw or not str(raw).strip():
            raise InvalidRequest(f"the body is empty: send a JSON object like {example}")
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_errors(exc, example)) from None


def parse_generate_request(raw: bytes | str | dict[str, Any], max_prompt_chars: int) -> GenerateRequest:
    """Validate a generate request, including the prompt length limit."""
    request = parse_body(GenerateRequest, raw, '{"prompt": "Hello"}')
    if len(request.prompt) > max_prompt_chars:
        raise InvalidRequest(
            f"prompt: is {len(request.prompt)} characters; the limit is {max_prompt_chars} (MINIVAULT_MAX_PROMPT_CHARS)"
        )
    return request


def describe_validation_errors(exc: ValidationError, example: str = '{"prompt": "Hello"}') -> str:
    """Pydantic's errors as `field: why` phrases a person can act on."""
    phrases = []
    for error in exc.errors(include_url=False):
        kind = error["type"]
        field = ".".join(str(part) for part in error["loc"])
        if kind == "json_invalid":
            reason = error.get("ctx", {}).get("error", "invalid JSON")
            phrases.append(f"the body is not valid JSON ({reason}): send an object like {example}")
        elif kind == "model_type" or (kind == "model_attributes_type" and not field):
            phrases.append(f"the body must be a JSON object like {example}")
        elif kind == "extra_forbidden":
            phrases.append(f"{field}: unknown field; remove it")
        elif kind == "missing":
            phrases.append(f"{field}: is required")
        else:
            phrases.append(f"{field}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(phrases)
