"""A fake OpenAI-compatible server (as vLLM and llama.cpp's llama-server answer), for the openai backend's tests.

A real HTTP server (an ASGI app, served by `serve_in_thread`):
  GET  /v1/models            the names in `models`
  POST /v1/chat/completions  `stream: true`: `chat.completion.chunk` frames (the role first, then thinking, text and
                             tool-call deltas, the finishing frame, the usage frame when `stream_options.include_usage`)
                             and `data: [DONE]`; otherwise one `chat.completion`
  POST /v1/completions       the prompt echoed (a raw prompt); with `suffix`: "<fim prefix=P suffix=S>" (lengths in
                             characters) when "suffix" is in `fim`, else llama.cpp's 400 "Unsupported param: suffix"
  POST /infill               llama.cpp's fill-in-the-middle (`input_prefix`, `input_suffix`; frames of `content`
                             and `stop`) when "infill" is in `fim`: "<fim prefix=P suffix=S>"; 501 as llama.cpp
                             answers for a model without FIM tokens when "infill-unsupported" is; else 404
  GET  /props, POST /tokenize  with `context` set (tokens; one token per word, 4 per message and 3 per prompt for the
                             template): llama-server's (`default_generation_settings.n_ctx`; `{"content"}` ->
                             `{"tokens"}`) when `context_source` is "props", else vLLM's (`max_model_len` in
                             /v1/models; `{"model", "prompt"}` -> `{"count"}`, no /props). A chat prompt of `context`
                             tokens or more is llama-server's 400 `exceed_context_size_error` (vLLM's words: with
                             max_tokens); `paths` records every (method, path)
A model not in `models` is a 404 in vLLM's words. What the answer holds, by the request:
  text                 the last user message's text, one word per delta; `max_tokens` cuts it (finish "length")
  images               `image_url` data: URLs: the answer starts "I see N image(s): S1, S2 bytes." (decoded sizes)
  tool results         when the conversation ends with `tool` messages: "<tool_call_id> said: <content>" per result
  tools                `tool_calls` (scripted `[{"name", "arguments": JSON text, "id"?}]`), or with `tool_marker`
                       ("CALL_TOOL"; "CALL_TOOL:name" picks the tool) in the last user message, or `tool_choice`
                       "required" / a named function, a call of the tool (arguments: an instance of its parameters,
                       as `json.dumps` writes it); none with `tool_choice: "none"`. Streamed as OpenAI streams them:
                       the id, type and name first, then the arguments in pieces of `fragment` characters, and
                       finish_reason "tool_calls". Ids are "call_<index>_<name>" unless scripted.
  reasoning_effort     thinking first: "Thinking (<effort>) about: <prompt>" (`thinking` overrides the text), in
                       `reasoning_field` ("reasoning_content", or vLLM's newer "reasoning")
  response_format      json_object: `{"answer": "<text>"}`; json_schema: an instance of its schema (each string the
                       text)
  `refusals`           model -> the 400 message that model answers with (a server refusing what a model cannot do)
Every request with a body is recorded: `received` (path, parsed JSON), `raw_requests` (path, bytes) and
`last_request[path]`.
"""

import base64
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from app.main import create_app
from tests.conftest import make_settings
from tests.support.dialect_servers import Gateway, wait_started
from tests.support.fake_ollama_wire import schema_instance
from tests.support.servers import serve_in_thread

DEFAULT_MODELS = ["qwen2.5:0.5b", "qwen3:0.6b"]
CREATED = 1767225600


@dataclass
class Answer:
    """What the fake answers one chat request with: thinking pieces, text pieces, tool calls, the finish reason."""

    thinking: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    finish: str = "stop"
    prompt_tokens: int = 0


class FakeOpenAI:
    """The ASGI app, scripted and inspected through its attributes (see the module's docstring)."""

    def __init__(self, models: list[str] | None = None) -> None:
        self.models = list(models or DEFAULT_MODELS)
        self.received: list[tuple[str, Any]] = []
        self.raw_requests: list[tuple[str, bytes]] = []
        self.last_request: dict[str, Any] = {}
        self.tool_calls: list[dict[str, str]] | None = None
        self.tool_marker = "CALL_TOOL"
        self.fragment = 4
        self.thinking: str | None = None
        self.reasoning_field = "reasoning_content"
        self.fim: set[str] = {"infill"}
        self.refusals: dict[str, str] = {}
        self.context: int | None = None
        self.context_source = "props"
        self.paths: list[tuple[str, str]] = []

    def requests(self, path: str) -> list[Any]:
        """The parsed bodies sent to `path`, in order."""
        return [body for where, body in self.received if where == path]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        self.paths.append((method, path))
        body = b"" if method in ("GET", "HEAD") else await _read_body(receive)
        payload: Any = None
        if body:
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                payload = None
            self.raw_requests.append((path, body))
            self.received.append((path, payload))
            self.last_request[path] = payload
        if path == "/v1/models" and method == "GET":
            data = [{"id": name, "object": "model", "created": CREATED, "owned_by": "fake"} for name in self.models]
            if self.context is not None and self.context_source == "models":
                data = [{**item, "max_model_len": self.context} for item in data]
            await _json(send, 200, {"object": "list", "data": data})
            return
        llama = self.context is not None and self.context_source == "props"
        if path == "/props" and method == "GET" and llama:
            settings = {"n_ctx": self.context, "params": {"n_predict": -1}}
            await _json(send, 200, {"default_generation_settings": settings, "total_slots": 1,
                                    "model_path": f"/models/{self.models[0]}.gguf"})  # fmt: skip
            return
        if path == "/tokenize" and method == "POST" and self.context is not None:
            await self._tokenize(payload, send)
            return
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions", "/infill"):
            await _json(send, 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
            return
        if path == "/infill" and "infill" not in self.fim:
            if "infill-unsupported" in self.fim:
                message = "Infill is not supported by this model: prefix token is missing. suffix token is missing. "
                await _json(send, 501, {"error": {"code": 501, "message": message, "type": "not_supported_error"}})
            else:
                await _json(send, 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})
            return
        if not isinstance(payload, dict):
            await _error(send, 400, "the body is not a JSON object")
            return
        model = payload.get("model")
        if model not in self.models:
            await _error(send, 404, f"The model `{model}` does not exist.", "NotFoundError")
            return
        if model in self.refusals:
            await _error(send, 400, self.refusals[model])
            return
        if path == "/v1/chat/completions":
            if self.context is not None and await self._too_long(payload, send):
                return
            await self._chat(payload, send)
        elif path == "/v1/completions":
            await self._completion(payload, send)
        else:
            await self._infill(payload, send)

    # --- the context: /props, /tokenize, and the refusal of a prompt too long ------------------------------------

    def prompt_tokens(self, payload: dict[str, Any]) -> int:
        """The chat prompt's tokens as the fake's template renders it: words, 4 per message, 3 per prompt."""
        messages = [m for m in payload.get("messages") or () if isinstance(m, dict)]
        words = 0
        for message in messages:
            words += len(_text(message.get("content")).split())
            if message.get("tool_calls"):
                words += len(json.dumps(message["tool_calls"]).split())
        return words + 4 * len(messages) + 3

    async def _tokenize(self, payload: Any, send: Send) -> None:
        if not isinstance(payload, dict):
            await _error(send, 400, "the body is not a JSON object")
            return
        if self.context_source == "props":
            words = str(payload.get("content") or "").split()
            await _json(send, 200, {"tokens": [len(word) for word in words]})
        else:
            count = len(str(payload.get("prompt") or "").split())
            await _json(send, 200, {"count": count, "max_model_len": self.context, "tokens": list(range(count))})

    async def _too_long(self, payload: dict[str, Any], send: Send) -> bool:
        """Refuse a prompt that does not fit `context`, as the server would; True when refused."""
        assert self.context is not None
        tokens = self.prompt_tokens(payload)
        if self.context_source == "props":
            if tokens < self.context:
                return False
            error = {"code": 400, "message": "the request exceeds the available context size, try increasing it",
                     "type": "exceed_context_size_error", "n_prompt_tokens": tokens, "n_ctx": self.context}  # fmt: skip
            await _json(send, 400, {"error": error})
            return True
        wanted = payload.get("max_tokens") or 0
        if tokens + wanted <= self.context:
            return False
        await _error(send, 400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {tokens + wanted} tokens ({tokens} in the messages, {wanted} in the "
                                "completion). Please reduce the length of the messages or completion.")  # fmt: skip
        return True

    # --- /v1/chat/completions ---------------------------------------------------------------------------------

    def answer(self, payload: dict[str, Any]) -> Answer:
        """What a chat request is answered with (see the module's docstring)."""
        messages = [m for m in payload.get("messages") or () if isinstance(m, dict)]
        prompt = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        text = prompt
        results = _trailing_tool_results(messages)
        if results:
            text = " ".join(f"{m.get('tool_call_id')} said: {_text(m.get('content'))}" for m in results)
        sizes = [len(image) for m in messages if m.get("role") == "user" for image in _images(m.get("content"))]
        if sizes:
            text = f"I see {len(sizes)} image(s): {', '.join(map(str, sizes))} bytes." + (f" {text}" if text else "")
        response_format = payload.get("response_format") or {}
        if response_format.get("type") == "json_object":
            text = json.dumps({"answer": text})
        elif response_format.get("type") == "json_schema":
            text = json.dumps(schema_instance(response_format["json_schema"]["schema"], text))
        answer = Answer(prompt_tokens=sum(len(_text(m.get("content")).split()) for m in messages))
        effort = payload.get("reasoning_effort")
        if effort is not None:
            answer.thinking = _words(self.thinking or f"Thinking ({effort}) about: {prompt}")
        answer.tool_calls = [] if results else self._calls(payload, prompt)
        if answer.tool_calls:
            answer.finish = "tool_calls"
            return answer
        words = _words(text)
        limit = payload.get("max_tokens")
        if isinstance(limit, int) and limit < len(words):
            words, answer.finish = words[:limit], "length"
        answer.content = words
        return answer

    def _calls(self, payload: dict[str, Any], prompt: str) -> list[dict[str, str]]:
        tools = [t.get("function") or {} for t in payload.get("tools") or () if isinstance(t, dict)]
        choice = payload.get("tool_choice")
        if not tools or choice == "none":
            return []
        if self.tool_calls is not None:
            scripted = self.tool_calls
        else:
            named = re.search(re.escape(self.tool_marker) + r":([\w-]+)", prompt) if self.tool_marker else None
            if isinstance(choice, dict):
                wanted = (choice.get("function") or {}).get("name")
            elif named:
                wanted = named.group(1)
            elif choice == "required" or (self.tool_marker and self.tool_marker in prompt):
                wanted = tools[0].get("name")
            else:
                return []
            chosen = next((t for t in tools if t.get("name") == wanted), tools[0])
            arguments = schema_instance(chosen.get("parameters") or {"type": "object"}, None)
            scripted = [{"name": chosen.get("name", ""), "arguments": json.dumps(arguments)}]
        return [
            {"id": call.get("id") or f"call_{index}_{call['name']}", "name": call["name"],
             "arguments": call["arguments"]}
            for index, call in enumerate(scripted)
        ]  # fmt: skip

    async def _chat(self, payload: dict[str, Any], send: Send) -> None:
        answer = self.answer(payload)
        usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": _generated(answer),
                 "total_tokens": answer.prompt_tokens + _generated(answer)}  # fmt: skip
        model = payload["model"]
        if not payload.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(answer.content) or None}
            if answer.thinking:
                message[self.reasoning_field] = "".join(answer.thinking)
            if answer.tool_calls:
                message["tool_calls"] = [_whole_call(call) for call in answer.tool_calls]
            choice = {"index": 0, "message": message, "finish_reason": answer.finish}
            await _json(send, 200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": CREATED,
                                    "model": model, "choices": [choice], "usage": usage})  # fmt: skip
            return
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        deltas += [{self.reasoning_field: piece} for piece in answer.thinking]
        deltas += [{"content": piece} for piece in answer.content]
        for index, call in enumerate(answer.tool_calls):
            head = {"index": index, "id": call["id"], "type": "function",
                    "function": {"name": call["name"], "arguments": ""}}  # fmt: skip
            deltas.append({"tool_calls": [head]})
            arguments = call["arguments"]
            for start in range(0, len(arguments), self.fragment):
                piece = arguments[start : start + self.fragment]
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        frames = [_chunk(model, [{"index": 0, "delta": delta, "finish_reason": None}]) for delta in deltas]
        frames.append(_chunk(model, [{"index": 0, "delta": {}, "finish_reason": answer.finish}]))
        if (payload.get("stream_options") or {}).get("include_usage"):
            frames.append({**_chunk(model, []), "usage": usage})
        await _stream(send, [b"data: " + orjson.dumps(frame) for frame in frames] + [b"data: [DONE]"])

    # --- /v1/completions and /infill -----------------------------------------------------------------------------

    async def _completion(self, payload: dict[str, Any], send: Send) -> None:
        prompt, suffix = payload.get("prompt") or "", payload.get("suffix")
        if suffix is not None and "suffix" not in self.fim:
            await _error(send, 400, "Unsupported param: suffix")
            return
        text = f"<fim prefix={len(prompt)} suffix={len(suffix)}>" if suffix is not None else prompt
        words = _words(text)
        model = payload["model"]
        frames = [{"id": "cmpl-fake", "object": "text_completion", "created": CREATED, "model": model,
                   "choices": [{"index": 0, "text": word, "finish_reason": None}]} for word in words]  # fmt: skip
        frames.append({"id": "cmpl-fake", "object": "text_completion", "created": CREATED, "model": model,
                       "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})  # fmt: skip
        frames.append({"id": "cmpl-fake", "object": "text_completion", "created": CREATED, "model": model,
                       "choices": [], "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(words),
                                                "total_tokens": len(prompt.split()) + len(words)}})  # fmt: skip
        await _stream(send, [b"data: " + orjson.dumps(frame) for frame in frames] + [b"data: [DONE]"])

    async def _infill(self, payload: dict[str, Any], send: Send) -> None:
        prefix, suffix = payload.get("input_prefix") or "", payload.get("input_suffix") or ""
        words = _words(f"<fim prefix={len(prefix)} suffix={len(suffix)}>")
        limit = payload.get("n_predict")
        stop_type = "eos"
        if isinstance(limit, int) and 0 <= limit < len(words):
            words, stop_type = words[:limit], "limit"
        frames: list[dict[str, Any]] = [{"index": 0, "content": word, "stop": False} for word in words]
        frames.append({"index": 0, "content": "", "stop": True, "stop_type": stop_type, "tokens_predicted": len(words),
                       "tokens_evaluated": len(prefix.split()) + len(suffix.split())})  # fmt: skip
        # llama.cpp's own endpoints end without `[DONE]`.
        await _stream(send, [b"data: " + orjson.dumps(frame) for frame in frames])


def _chunk(model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "choices": choices}  # fmt: skip


def _whole_call(call: dict[str, str]) -> dict[str, Any]:
    return {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def _generated(answer: Answer) -> int:
    return len(answer.thinking) + len(answer.content) + len(answer.tool_calls)


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text) or [text]


def _text(content: object) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _images(content: object) -> list[bytes]:
    """The decoded bytes of a message's `image_url` data: URLs."""
    if not isinstance(content, list):
        return []
    urls = [(p.get("image_url") or {}).get("url", "") for p in content if isinstance(p, dict)
            and p.get("type") == "image_url"]  # fmt: skip
    return [base64.b64decode(url.split(",", 1)[1]) for url in urls]


def _trailing_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, message)
    return results


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": orjson.dumps(body)})


async def _error(send: Send, status: int, message: str, kind: str = "BadRequestError") -> None:
    """An error in vLLM's shape."""
    await _json(send, status, {"error": {"message": message, "type": kind, "param": None, "code": status}})


async def _stream(send: Send, events: list[bytes]) -> None:
    """Server-Sent Events, one `send` per event, as a server writes them while generating."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for event in events:
        await send({"type": "http.response.body", "body": event + b"\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b""})


@dataclass
class OpenAIGateway(Gateway):
    """MiniVault with MINIVAULT_BACKEND=openai in front of a FakeOpenAI (`upstream`)."""

    upstream: FakeOpenAI


@contextmanager
def openai_gateway(log_path: Path, fake: FakeOpenAI | None = None, **overrides: Any) -> Iterator[OpenAIGateway]:
    """MiniVault over a fresh (or the given) fake OpenAI-compatible server, its first model the default."""
    fake = fake or FakeOpenAI()
    with serve_in_thread(fake, lifespan="off") as upstream:
        settings = make_settings(backend="openai", openai_base_url=upstream.url, openai_model=fake.models[0],
                                 log_path=log_path, **overrides)  # fmt: skip
        app = create_app(settings)
        with serve_in_thread(app) as server:
            yield OpenAIGateway(wait_started(server), app, log_path, None, fake)
