"""The OpenAI-compatible API: `/v1/chat/completions`, `/v1/completions` and `/v1/models`, so any OpenAI
client (the SDKs, LangChain, Continue, Open WebUI) can use MiniVault by changing its base URL.

Auth, limits, timeouts, the log (`endpoint: "openai"`) and the history apply as on `/generate`;
errors take OpenAI's shape (`wire.error_body`, registered with the app as DIALECT).
"""

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from app.backends import Backend, ChatInput, ModelInfo
from app.core.exchange import Exchange
from app.dialects.inputs import InputLimits
from app.dialects.openai import wire as openai
from app.dialects.relay import answer, read_exchange
from app.errors import ModelNotFound
from app.web.errors import Dialect
from app.web.responses import OrjsonResponse

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: str | None


class OpenAIErrorBody(BaseModel):
    """Every error on /v1, in OpenAI's shape, so its SDKs raise their usual exceptions."""

    error: OpenAIErrorDetail


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        404: "model_not_found: the backend has no such model",
        413: "payload_too_large: the body is over MINIVAULT_MAX_BODY_BYTES",
        422: "invalid_request: the body is not valid, or asks for something MiniVault cannot do (`param` names it)",
        429: "busy: MiniVault's queue is full; rate_limited: over MINIVAULT_RATE_LIMIT (Retry-After says when)",
        502: "backend_error: the upstream failed",
        503: "backend_unavailable, shutting_down or model_loading",
        504: "backend_timeout: the upstream did not answer in time",
    }
    return {status: {"model": OpenAIErrorBody, "description": descriptions[status]} for status in statuses}


_GENERATION_ERRORS = _errors(404, 413, 422, 429, 502, 503, 504)
_STREAM = {
    "text/event-stream": {
        # One event: OpenAI's frames are unnamed, `data` only (JSON, or `[DONE]` at the end).
        "schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}},
        "example": 'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":'
        '{"content":"Hi"},"finish_reason":null}]}\n\ndata: [DONE]\n\n',
    }
}


def _body(schema: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


def _chat_answer(message: dict[str, Any], finish: str, usage: tuple[int, int]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-5f0c3f7e", "object": "chat.completion", "created": 1764452456, "model": "tinyllama:1.1b-chat",
        "choices": [{"index": 0, "message": {"role": "assistant", "refusal": None, **message}, "logprobs": None,
                     "finish_reason": finish}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
        "system_fingerprint": None,
    }  # fmt: skip


_CHAT_ANSWERS = {
    "text": {"summary": "An answer", "value": _chat_answer(
        {"content": "Sunlight scatters off air molecules."}, "stop", (24, 8))},
    "tool_calls": {"summary": "A tool call (`tools` offered): arguments as the model wrote them", "value": _chat_answer(
        {"content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}, "tool_calls", (80, 12))},
    "reasoning": {"summary": "With `reasoning_effort`: the thinking as `reasoning_content`", "value": _chat_answer(
        {"content": "No: 91 is 7 times 13.", "reasoning_content": "91 / 7 = 13, so it has a factor."},
        "stop", (16, 30))},
}  # fmt: skip
_REASONING_STREAM = (
    'data: {"id":"chatcmpl-2","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant",'
    '"reasoning_content":"Paris is the capital."},"finish_reason":null}]}\n\n'
    'data: {"id":"chatcmpl-2","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Paris"},'
    '"finish_reason":null}]}\n\n'
    'data: {"id":"chatcmpl-2","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},'
    '"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
)
_TOOL_CALL_STREAM = (
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant",'
    '"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]},'
    '"finish_reason":null}]}\n\n'
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":'
    '[{"index":0,"function":{"arguments":"{\\"city\\": \\"Paris\\"}"}}]},"finish_reason":null}]}\n\n'
    'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},'
    '"finish_reason":"tool_calls"}]}\n\ndata: [DONE]\n\n'
)


@router.post(
    "/chat/completions",
    responses={
        200: {
            "description": "A `chat.completion`, or with `stream: true` `chat.completion.chunk` events ending "
            "with `data: [DONE]` (thinking as `delta.reasoning_content`, tool calls as `delta.tool_calls`: the id "
            'and name first, then fragments of the arguments, and `finish_reason: "tool_calls"`).',
            "content": {
                "application/json": {"examples": _CHAT_ANSWERS},
                "text/event-stream": {
                    "schema": _STREAM["text/event-stream"]["schema"],
                    "examples": {
                        "text": {"summary": "An answer", "value": _STREAM["text/event-stream"]["example"]},
                        "tool_calls": {"summary": "A tool call", "value": _TOOL_CALL_STREAM},
                        "reasoning": {
                            "summary": "Thinking (reasoning_effort), then the answer",
                            "value": _REASONING_STREAM,
                        },
                    },
                },
            },
        },
        **_GENERATION_ERRORS,
    },
    openapi_extra=_body("ChatCompletionRequest"),
)
async def chat_completions(request: Request) -> Response:
    """OpenAI's chat completions: messages in, one answer out (streamed with `stream: true`)."""
    return await _complete(request, openai.parse_chat_request, openai.chat_completion, chat=True)


@router.post(
    "/completions",
    responses={
        200: {
            "description": "A `text_completion`, or with `stream: true` its chunks ending with `data: [DONE]`; "
            "with `suffix`, the text that goes between the prompt and the suffix.",
            "content": {
                "application/json": {
                    "example": {
                        "id": "cmpl-5f0c3f7e",
                        "object": "text_completion",
                        "created": 1764452456,
                        "model": "tinyllama:1.1b-chat",
                        "choices": [
                            {"text": " there was a lighthouse.", "index": 0, "logprobs": None, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
                    }
                },  # fmt: skip
                **_STREAM,
            },
        },
        **_GENERATION_ERRORS,
    },
    openapi_extra=_body("CompletionRequest"),
)
async def completions(request: Request) -> Response:
    """OpenAI's legacy text completions: one prompt, through the model's chat template like Ollama's /v1; with
    `suffix`, fill-in-the-middle (the model must support insert)."""
    return await _complete(request, openai.parse_completion_request, openai.text_completion, chat=False)


async def _complete(
    request: Request,
    parse: Callable[[bytes, InputLimits], tuple[openai.Sampling, ChatInput]],
    whole: Callable[[Exchange], dict[str, Any]],
    chat: bool,
) -> Response:
    body, exchange = await read_exchange(request, "openai", parse)
    assert exchange is not None  # OpenAI's requests always ask something
    chunks = openai.ChunkStream(exchange, chat=chat, include_usage=body.include_usage)
    return await answer(
        request, exchange, stream=body.stream, whole=whole, token=chunks.token, end=chunks.end,
        on_error=DIALECT.stream_error, media_type="text/event-stream",
    )  # fmt: skip


async def _model(info: ModelInfo, backend: Backend) -> dict[str, Any]:
    """One model as OpenAI lists it, with what MiniVault accepts for it (Ollama's capability names)."""
    return {
        "id": info.name, "object": "model", "created": openai.timestamp(info.modified_at), "owned_by": backend.name,
        "capabilities": sorted(await backend.capabilities(info.name)),
    }  # fmt: skip


_MODEL_EXAMPLE = {
    "id": "tinyllama:1.1b-chat", "object": "model", "created": 1764452456, "owned_by": "ollama",
    "capabilities": ["completion", "tools"],
}  # fmt: skip


@router.get(
    "/models",
    responses={
        200: {"description": "The models the backend has.",
              "content": {"application/json": {"example": {"object": "list", "data": [_MODEL_EXAMPLE]}}}},
        **_errors(502, 503, 504),
    },
)  # fmt: skip
async def list_models(request: Request) -> OrjsonResponse:
    """The models the backend has, as OpenAI lists them, each with its `capabilities`."""
    backend: Backend = request.app.state.backend
    found = await backend.list_models()
    return OrjsonResponse({"object": "list", "data": await asyncio.gather(*(_model(m, backend) for m in found))})


@router.get(
    "/models/{model_id:path}",
    responses={
        200: {"description": "One model.", "content": {"application/json": {"example": _MODEL_EXAMPLE}}},
        **_errors(404, 502, 503, 504),
    },
)
async def get_model(model_id: str, request: Request) -> OrjsonResponse:
    """One model, or 404 `model_not_found` naming those there are."""
    backend: Backend = request.app.state.backend
    found = await backend.list_models()
    for info in found:
        if info.name == model_id:
            return OrjsonResponse(await _model(info, backend))
    names = ", ".join(m.name for m in found) or "none"
    error = ModelNotFound(f"The model '{model_id}' does not exist here (the backend has: {names})")
    error.param = "model"
    raise error


DIALECT = Dialect("openai", router.prefix + "/", router, openai.error_body, openai.error_frame)
