"""A fake Ollama: a real HTTP server that streams `/api/generate` and `/api/chat` as NDJSON, token by token.

The model name picks the behaviour, so one server serves every test:
  any name in `models`   echo the prompt back, one word per line, `fake.delay` seconds apart
  "slow:latest"          like echo but 400 tokens, 20 ms apart (for cancel / disconnect tests)
  "split:latest"         echo, but every line is sent in 3-byte pieces (split UTF-8 included)
  "fail-500:latest"      answers 500 with an `error` object
  "error-line:latest"    two tokens, then an in-band `{"error": ...}` line
  "no-done:latest"       tokens, then the stream ends without `done`
  "garbage:latest"       a token, then a line that is not JSON
  "break:latest"         a token, then the TCP connection is cut mid-response
  "hang:latest"          never answers (until the client gives up)
  "busy:latest"          answers 503 with Ollama's "maximum pending requests exceeded" error (full queue)
  "stall:latest"         200, tokens `s0 ` and `s1 `, then silence until the client gives up (idle timeout)
  "stall-headers:latest" 200 headers, then silence until the client gives up (first-token timeout)
  "drip:latest"          200 tokens `d{i} `, 50 ms apart (total-timeout while tokens keep flowing)
  anything else          404, as Ollama answers for a model that is not pulled
A generate request with no "prompt" is a load request, as in Ollama: it answers one JSON object
with `done_reason: "load"` once the test releases `fake.loaded` (released by default), counted in `loads`.
`/api/pull` streams progress for any name (and adds it to `models`), except names starting
"no-such", which end in the registry's "file does not exist" error line; pulls are counted in `pulls`,
`fail_pulls` makes that many next pulls end in a registry error, and clearing `pulled` holds a pull
halfway through its first layer until the test sets it again.
`/api/show` and `/api/delete` know the models in `models` (404 otherwise; delete removes it), and
`/api/ps` lists the first model as loaded.
Like Ollama, it stops generating only when it notices its client has gone, by watching
`receive()` for `http.disconnect`, and counts those disconnects for the tests.

The rest of Ollama's wire format (docs/api.md, server/routes.go), scripted by attributes of the instance:
  `received`, `raw_requests`  every request with a body, in order: `(path, parsed JSON)` and `(path, bytes)`;
                       `last_request[path]` the last parsed body per path (`requests` stays as it was:
                       generate/chat payloads only, a chat's with `prompt` and `chat: True` added)
  `capabilities`       model name -> Ollama's capabilities ("completion", "tools", "thinking", "vision",
                       "insert", "embedding"); a name not in it has `default_capabilities`, ["completion", "tools"];
                       `add_model(name, capabilities)` adds a model and its row. `/api/show` reports them.
  tools (chat)         with `tools` in the request, the answer is `message.tool_calls` (content "", one chunk, then
                       done_reason "stop") when `tool_calls` is set (`[{"name", "arguments", "id"?, "index"?}]`,
                       None by default) or the last user message has `tool_marker` ("CALL_TOOL"; "CALL_TOOL:name"
                       picks the tool, else the first, its arguments built from its parameters schema). Each call
                       is `{"id": "call_<8>", "function": {"index", "name", "arguments"}}`. No calls when the last
                       message is a tool result: the answer then reads "<tool_name> said: <content>" per result.
                       A model without "tools": 400 "registry.ollama.ai/library/M:T does not support tools".
  think                true or "low"/"medium"/"high"/"max" on a model with "thinking" (which, as Ollama, thinks
                       unless `think` is false): `message.thinking` / `thinking` chunks before the content, the
                       text `thinking` or "Thinking (<level>) about: <prompt>" (true is "medium"); on a model
                       without it, 400 '"M" does not support thinking'
  format               "json": the answer is `{"answer": "<text>"}`; a JSON schema: a small instance of it (every
                       string "<text>", see fake_ollama_wire.schema_instance), both streamed in several chunks
  images               base64 in `images` / `messages[].images`: without "vision" 400 "this model does not
                       support image input" (invalid base64: Go's "illegal base64 data at input byte N"); with it
                       the answer starts "I see N image(s): S1, S2 bytes." (decoded sizes), then the text
  suffix (generate)    without "insert" 400 "registry.ollama.ai/library/M:T does not support insert"; with it the
                       answer is "<fim prefix=P suffix=S>" (lengths in characters); `raw: true` echoes the prompt,
                       suffix or not (Ollama applies a suffix through the template raw mode skips; it still needs
                       "insert"), and with `template`, `system` or `context` is Ollama's 400
  /api/embed           {model, input: str|list, truncate?, dimensions?, keep_alive?} -> {model, embeddings,
                       total_duration, load_duration, prompt_eval_count}: unit vectors of `embedding_length` (8)
                       floats from sha256 of each text, cut and renormalised to `dimensions`; `/api/embeddings`
                       {model, prompt} -> {embedding}; a model without "embedding": 400 "... does not support
                       embedding" (real Ollama embeds with any model; the fake is stricter on purpose)
  keep_alive           recorded per model in `keep_alive`; 0 with no prompt (no messages) unloads the model:
                       done_reason "unload", counted in `unloads`, gone from `/api/ps` until a request uses it
                       again; 0 with a prompt unloads it after answering. A value Ollama cannot read: its 400.
  /api/ps              lists `running` (None: the first model, as before) minus the unloaded, with Ollama's fields
                       (expires_at from the last keep_alive, 5 minutes by default; `context_length`, 4096)
  `stream: false`      one JSON object (content, thinking and tool calls gathered) for every model but the
                       special ones above, which stream whatever `stream` says
"""

import asyncio
import base64
import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from starlette.types import Message, Receive, Scope, Send

from tests.support.fake_ollama_wire import (
    THINK_LEVELS,
    base64_error,
    embedding,
    full_name,
    go_quote,
    keep_alive_seconds,
    schema_instance,
    think_error,
    tool_call,
)

DEFAULT_MODELS = ["tinyllama:1.1b-chat", "llama3:latest"]
SPECIAL_MODELS = [
    "slow:latest", "split:latest", "fail-500:latest", "error-line:latest", "no-done:latest",
    "garbage:latest", "break:latest", "hang:latest", "busy:latest", "stall:latest", "stall-headers:latest",
    "drip:latest",
]  # fmt: skip
# What a model can do when `capabilities` does not name it: chat and generate, and tools (so tools pass unless a
# test takes them away); thinking, vision, insert and embedding are opt-in per model.
DEFAULT_CAPABILITIES = ["completion", "tools"]
MODIFIED_AT = "2026-01-01T00:00:00Z"
# Ollama's default keep_alive when a request names none.
DEFAULT_KEEP_ALIVE = 300.0


@dataclass
class Answer:
    """What the fake generates for one request: thinking pieces, content pieces and tool calls, in that order."""

    content: list[str]
    thinking: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class FakeOllama:
    """An ASGI app plus counters the tests can wait on."""

    def __init__(self, models: list[str] | None = None, delay: float = 0.0) -> None:
        self.models = list(models or DEFAULT_MODELS) + SPECIAL_MODELS
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.client_ports: list[int] = []
        self.started = 0
        self.finished = 0
        self.disconnects = 0
        self.busy = 0
        self.loads = 0
        self.pulls = 0
        self.fail_pulls = 0
        self.unloads = 0
        # Cleared by a test to hold load requests (model warm-up) until it sets it again.
        self.loaded = threading.Event()
        self.loaded.set()
        # Likewise for pulls: cleared, a pull stops at 50% of its first layer until it is set.
        self.pulled = threading.Event()
        self.pulled.set()
        self._changed = threading.Condition()
        # The wire as it came: every request with a body, parsed and as bytes, and the last body per path.
        self.received: list[tuple[str, Any]] = []
        self.raw_requests: list[tuple[str, bytes]] = []
        self.last_request: dict[str, Any] = {}
        self.capabilities: dict[str, list[str]] = {}
        self.default_capabilities = list(DEFAULT_CAPABILITIES)
        self.tool_calls: list[dict[str, Any]] | None = None
        self.tool_marker = "CALL_TOOL"
        self.thinking: str | None = None
        self.embedding_length = 8
        self.context_length = 4096
        self.running: list[str] | None = None
        self.unloaded: set[str] = set()
        self.keep_alive: dict[str, Any] = {}
        self._expires: dict[str, float] = {}

    @property
    def active(self) -> int:
        return self.started - self.finished - self.disconnects

    def add_model(self, name: str, capabilities: list[str]) -> None:
        """Have `name` (as pulled) with these capabilities, e.g. `["completion", "thinking"]` or `["embedding"]`."""
        if name not in self.models:
            self.models.append(name)
        self.capabilities[name] = list(capabilities)

    def capabilities_of(self, model: str) -> list[str]:
        """The capabilities of `model` (a bare name means `:latest`), from `capabilities` or the defaults."""
        for name in (model, model if ":" in model else f"{model}:latest"):
            if name in self.capabilities:
                return self.capabilities[name]
        return self.default_capabilities

    def wait_until(self, predicate: Callable[["FakeOllama"], bool], timeout: float = 10.0) -> None:
        """Block the calling thread until `predicate(self)` holds; fail after `timeout` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout=timeout):
                raise AssertionError(
                    f"fake Ollama never reached the expected state (started={self.started}, "
                    f"finished={self.finished}, disconnects={self.disconnects}, busy={self.busy}, "
                    f"loads={self.loads}, pulls={self.pulls})"
                )

    def _count(self, field: str) -> None:
        with self._changed:
            setattr(self, field, getattr(self, field) + 1)
            self._changed.notify_all()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        body = b"" if method in ("GET", "HEAD") else await _read_body(receive)
        if body:
            self._record(path, body)
        if path == "/" and method in ("GET", "HEAD"):
            await _respond(send, 200, b"Ollama is running", b"text/plain")
        elif path == "/api/version":
            await _json(send, 200, {"version": "0.0.0-fake"})
        elif path == "/api/tags":
            models = [{"name": name, "model": name, "size": 1000 + i, "modified_at": MODIFIED_AT,
                       "digest": _digest(name), "details": {"family": "fake"}}
                      for i, name in enumerate(self.models)]  # fmt: skip
            await _json(send, 200, {"models": models})
        elif path == "/api/ps":
            await _json(send, 200, {"models": [self._running_entry(name) for name in self._running()]})
        elif path == "/api/show" and method == "POST":
            model = _model_of(body)
            # Like Ollama, a name without a tag means `:latest`.
            tagged = model if not isinstance(model, str) or ":" in model else f"{model}:latest"
            if isinstance(model, str) and tagged in self.models:
                await _json(send, 200, self._shown(tagged))
            else:
                await _json(send, 404, {"error": f"model '{model}' not found"})
        elif path == "/api/delete" and method == "DELETE":
            model = _model_of(body)
            if model in self.models:
                self.models.remove(model)
                await _respond(send, 200, b"", b"application/json")
            else:
                await _json(send, 404, {"error": f"model '{model}' not found"})
        elif path == "/api/pull" and method == "POST":
            payload = _object_of(body)
            if payload is not None and isinstance(payload.get("model"), str):
                await self._pull(payload, receive, send)
            else:
                await _json(send, 400, {"error": "invalid request body"})
        elif path == "/api/generate" and method == "POST":
            self.client_ports.append(scope["client"][1])
            await self._generate(orjson.loads(body), receive, send)
        elif path == "/api/chat" and method == "POST":
            # The same behaviours as /api/generate, answering the last user message in chat's line format.
            payload = orjson.loads(body)
            messages = payload.get("messages") or ()
            user = [m.get("content") or "" for m in messages if m.get("role") == "user"]
            if messages:
                await self._generate({**payload, "prompt": user[-1] if user else "", "chat": True}, receive, send)
            else:
                # No messages: Ollama's load (or, with keep_alive 0, unload) request, as a prompt-less generate.
                await self._generate({**payload, "chat": True}, receive, send)
        elif path in ("/api/embed", "/api/embeddings") and method == "POST":
            await self._embed(path, _object_of(body), send)
        else:
            await _respond(send, 404, b"404 page not found", b"text/plain")

    def _record(self, path: str, body: bytes) -> None:
        try:
            parsed: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        self.raw_requests.append((path, body))
        self.received.append((path, parsed))
        self.last_request[path] = parsed

    async def _generate(self, payload: dict[str, Any], receive: Receive, send: Send) -> None:
        self.requests.append(payload)
        unreadable = _unreadable(payload)
        if unreadable is not None:
            await _json(send, 400, {"error": unreadable})
            return
        model = payload.get("model", "")
        if ":" not in model:
            model += ":latest"
        if model not in self.models:
            await _json(send, 404, {"error": f"model '{model}' not found, try pulling it first"})
            return
        keep_alive = self._keep(model, payload)
        # Nothing to generate: a chat without messages, a generate without a prompt (as Ollama sees them).
        idle = "prompt" not in payload if payload.get("chat") else not payload.get("prompt")
        if keep_alive == 0 and idle:
            await self._unload(payload, model, send)
            return
        refused = self._refusal(payload, model)
        if refused is not None:
            await _json(send, 400, {"error": refused})
            return
        self.unloaded.discard(model)
        if "prompt" not in payload:
            await self._load(model, receive, send, chat=bool(payload.get("chat")))
            return
        if _images(payload) and "vision" not in self.capabilities_of(model):
            await _json(send, 400, {"error": "this model does not support image input"})
            return
        if model == "fail-500:latest":
            await _json(send, 500, {"error": "llama runner process has terminated: signal: killed"})
            return
        if model == "busy:latest":
            # Word for word what Ollama sends when OLLAMA_MAX_QUEUE is exceeded (double space included).
            await _json(send, 503, {"error": "server busy, please try again.  maximum pending requests exceeded"})
            self._count("busy")
            return
        self._count("started")
        gone, watcher = _watch_for_disconnect(receive)
        try:
            finished = await self._stream(payload, model, send, gone)
        finally:
            watcher.cancel()
        if keep_alive == 0:
            self.unloaded.add(model)  # Ollama expires the runner once a keep_alive 0 request is answered
        self._count("finished" if finished else "disconnects")

    def _keep(self, model: str, payload: dict[str, Any]) -> float:
        """Record the request's keep_alive and when the model would expire; the seconds it asks for."""
        seconds = keep_alive_seconds(payload.get("keep_alive"))
        if "keep_alive" in payload:
            self.keep_alive[model] = payload["keep_alive"]
        seconds = DEFAULT_KEEP_ALIVE if seconds is None else seconds
        self._expires[model] = time.time() + seconds
        return seconds

    def _refusal(self, payload: dict[str, Any], model: str) -> str | None:
        """Ollama's 400s before it schedules a model, in its order: raw mode, thinking, capabilities."""
        chat = bool(payload.get("chat"))
        capabilities = self.capabilities_of(model)
        if not chat and payload.get("raw") and any(payload.get(k) for k in ("template", "system", "context")):
            return "raw mode does not support template, system, or context"
        think = payload.get("think")
        if "thinking" not in capabilities and (think is True or think in THINK_LEVELS):
            return f"{go_quote(payload.get('model', ''))} does not support thinking"
        wanted = ["completion"]
        if chat and payload.get("tools"):
            wanted.append("tools")
        if not chat and payload.get("suffix"):
            wanted.append("insert")
        missing = [name for name in wanted if name not in capabilities]
        if "completion" in missing:
            return f"{go_quote(payload.get('model', ''))} does not support {'chat' if chat else 'generate'}"
        return f"{full_name(model)} does not support {chr(10).join(missing)}" if missing else None

    async def _unload(self, payload: dict[str, Any], model: str, send: Send) -> None:
        """Ollama's answer to keep_alive 0 with nothing to generate: the runner expires at once."""
        self.unloaded.add(model)
        self._count("unloads")
        answer: dict[str, Any] = {"model": payload.get("model", ""), "created_at": _now()}
        answer |= {"message": {"role": "assistant", "content": ""}} if payload.get("chat") else {"response": ""}
        await _json(send, 200, {**answer, "done": True, "done_reason": "unload"})

    async def _load(self, model: str, receive: Receive, send: Send, chat: bool = False) -> None:
        """Ollama loads a model for a generate request without a prompt; `loaded` holds the answer back."""
        self._count("loads")
        gone, watcher = _watch_for_disconnect(receive)
        try:
            # A threading.Event, set from the test's thread: looked at between short waits for the client leaving.
            while not self.loaded.is_set():
                try:
                    await asyncio.wait_for(gone.wait(), 0.01)
                except TimeoutError:
                    continue
                return
        finally:
            watcher.cancel()
        if chat:
            await _json(send, 200, {"model": model, "created_at": _now(),
                                    "message": {"role": "assistant", "content": ""}, "done": True,
                                    "done_reason": "load"})  # fmt: skip
            return
        await _json(send, 200, {"model": model, "created_at": _now(), "response": "", "done": True,
                                "done_reason": "load"})  # fmt: skip

    async def _embed(self, path: str, payload: dict[str, Any] | None, send: Send) -> None:
        """`/api/embed` (a list of vectors for `input`) and the older `/api/embeddings` (one for `prompt`)."""
        if payload is None:
            await _json(send, 400, {"error": "invalid request body"})
            return
        name: str = payload["model"] if isinstance(payload.get("model"), str) else ""
        model = name if ":" in name else f"{name}:latest"
        texts = payload.get("input") if path == "/api/embed" else payload.get("prompt")
        if isinstance(texts, str) or texts is None:
            texts = [texts] if texts else []
        if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
            await _json(send, 400, {"error": "invalid input type"})
            return
        try:
            keep_alive_seconds(payload.get("keep_alive"))
        except ValueError as exc:
            await _json(send, 400, {"error": str(exc)})
            return
        if model not in self.models:
            await _json(send, 404, {"error": f"model '{name}' not found"})
            return
        if "embedding" not in self.capabilities_of(model):
            await _json(send, 400, {"error": f"{full_name(model)} does not support embedding"})
            return
        self._keep(model, payload)
        self.unloaded.discard(model)
        vectors = [embedding(text, self.embedding_length, payload.get("dimensions")) for text in texts]
        if path == "/api/embeddings":
            await _json(send, 200, {"embedding": vectors[0] if vectors else []})
            return
        answer: dict[str, Any] = {"model": name, "embeddings": vectors}
        if vectors:
            count = sum(len(text.split()) for text in texts)
            answer |= {"total_duration": 2000, "load_duration": 1000, "prompt_eval_count": count}
        await _json(send, 200, answer)

    def _running(self) -> list[str]:
        names = self.running if self.running is not None else self.models[:1]
        return [name for name in names if name not in self.unloaded]

    def _running_entry(self, name: str) -> dict[str, Any]:
        """One of `/api/ps`'s models, with Ollama's fields."""
        seconds = self._expires.get(name, time.time() + DEFAULT_KEEP_ALIVE) - time.time()
        # Ollama keeps a model with a negative keep_alive for time.Duration's largest value (about 292 years).
        delta = timedelta(microseconds=2**63 // 1000) if math.isinf(seconds) else timedelta(seconds=seconds)
        expires = (datetime.now(UTC) + delta).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"name": name, "model": name, "size": 1000, "digest": _digest(name), "details": {"family": "fake"},
                "expires_at": expires, "size_vram": 1000, "context_length": self.context_length}  # fmt: skip

    def _shown(self, model: str) -> dict[str, Any]:
        """`/api/show` for a model the fake has: its capabilities, and model_info keyed by its architecture."""
        model_info = {
            "general.architecture": "llama",
            "general.parameter_count": 1_100_000_000,
            "llama.context_length": self.context_length,
            "llama.embedding_length": self.embedding_length,
        }
        return {"modelfile": f"FROM {model}", "parameters": "", "template": "{{ .Prompt }}",
                "details": {"family": "fake"}, "model_info": model_info,
                "capabilities": self.capabilities_of(model), "modified_at": MODIFIED_AT}  # fmt: skip

    async def _pull(self, payload: dict[str, Any], receive: Receive, send: Send) -> None:
        """Ollama's pull progress: a manifest, two layers downloading in steps, then success."""
        model = payload.get("model", "")
        self._count("pulls")
        failing = model.startswith("no-such") or self.fail_pulls > 0
        if self.fail_pulls > 0:
            self.fail_pulls -= 1
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})  # fmt: skip
        lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        if model.startswith("no-such"):
            lines.append({"error": "pull model manifest: file does not exist"})
        elif failing:
            lines.append({"error": 'pull model manifest: Get "https://registry.ollama.ai/v2/": dial tcp: i/o timeout'})
        else:
            for digest, total in (("sha256:2af3b81862c6", 637_000_000), ("sha256:af0ddbdaaa26", 1_200)):
                lines += [
                    {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": done}
                    for done in (0, total // 4, total // 2, total)
                ]
            lines += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
        for index, line in enumerate(lines):
            if self.delay:
                await asyncio.sleep(self.delay)
            await send({"type": "http.response.body", "body": orjson.dumps(line) + b"\n", "more_body": True})
            if index == 3 and not self.pulled.is_set() and not await _held(self.pulled, receive):
                return
        if not failing:
            self.models.append(model if ":" in model else f"{model}:latest")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, payload: dict[str, Any], model: str, send: Send, gone: asyncio.Event) -> bool:
        if model == "hang:latest":
            await gone.wait()
            return False
        options = payload.get("options") or {}
        prompt = payload.get("prompt", "")
        words = re.findall(r"\S+\s*", prompt) or [prompt]
        delay = self.delay
        answer = Answer(content=words)
        if model == "slow:latest":
            words, delay = [f"w{i} " for i in range(400)], 0.02
            answer = Answer(content=words)
        elif model == "drip:latest":
            words, delay = [f"d{i} " for i in range(200)], 0.05
            answer = Answer(content=words)
        elif model == "stall:latest":
            # Fixed, so exactly two tokens arrive whatever the prompt is.
            words = ["s0 ", "s1 "]
            answer = Answer(content=words)
        else:
            answer = self._answer(payload, model, prompt)
        limit = options.get("num_predict")
        content = answer.content
        tokens = content[:limit] if isinstance(limit, int) and limit >= 0 else content
        # Ollama answers `stream: false` with one object; the special models keep their failure modes either way.
        whole = payload.get("stream") is False and model not in SPECIAL_MODELS
        if not whole:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/x-ndjson")]})  # fmt: skip
        if model == "stall-headers:latest":
            # Headers are out, so only a first-token timeout (not a connect/response one) can end this.
            await gone.wait()
            return False
        started = time.monotonic_ns()
        pieces: list[tuple[str, Any]] = [("thinking", text) for text in answer.thinking]
        pieces += [("content", text) for text in tokens]
        if answer.tool_calls:
            # Ollama sends a model's tool calls whole, in one chunk of their own.
            pieces.append(("tool_calls", answer.tool_calls))
        for index, (kind, value) in enumerate(pieces):
            if delay:
                try:
                    await asyncio.wait_for(gone.wait(), delay)
                except TimeoutError:
                    pass
            if gone.is_set():
                return False
            if not whole:
                await self._send_line(send, model, _piece_line(payload, model, kind, value))
            if model in ("error-line:latest", "garbage:latest", "break:latest", "no-done:latest") and index == 1:
                break
        if model == "stall:latest":
            # The connection stays open and silent: only an idle-between-tokens timeout ends it.
            await gone.wait()
            return False
        if model == "error-line:latest":
            await self._send_line(
                send, model, {"error": "an error was encountered while running the model: GGML_ASSERT"}
            )
        elif model == "garbage:latest":
            await send({"type": "http.response.body", "body": b"<html>proxy error</html>\n", "more_body": True})
        elif model == "break:latest":
            raise ConnectionAbortedError("fake Ollama cuts the connection on purpose")
        elif model != "no-done:latest":
            # A chat's prompt is all its messages: the count shows how much context reached the model.
            messages = payload.get("messages") or () if payload.get("chat") else ()
            context = " ".join(m.get("content") or "" for m in messages)
            final = {
                **_token_line(payload, model, "".join(tokens) if whole else ""), "done": True,
                "done_reason": "length" if len(tokens) < len(content) else "stop",
                "total_duration": time.monotonic_ns() - started, "load_duration": 1000,
                "prompt_eval_count": len(context.split()) if context else len(words), "prompt_eval_duration": 1000,
                "eval_count": len(answer.thinking) + len(tokens) + len(answer.tool_calls), "eval_duration": 1000,
            }  # fmt: skip
            if whole:
                await _json(send, 200, _gathered(final, payload, answer))
                return True
            await self._send_line(send, model, final)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    def _answer(self, payload: dict[str, Any], model: str, prompt: str) -> Answer:
        """The answer of an ordinary model: the prompt echoed, or what the request's features call for."""
        chat = bool(payload.get("chat"))
        messages: list[dict[str, Any]] = list(payload.get("messages") or ()) if chat else []
        text = prompt
        results = _trailing_tool_results(messages)
        # Raw mode sends the prompt as it is: Ollama fills a suffix in only through the model's template.
        if not chat and payload.get("suffix") and not payload.get("raw"):
            text = f"<fim prefix={len(prompt)} suffix={len(payload['suffix'])}>"
        elif results:
            text = " ".join(f"{m.get('tool_name') or 'tool'} said: {m.get('content') or ''}" for m in results)
        images = [base64.b64decode(image) for image in _images(payload)]
        if images:
            sizes = ", ".join(str(len(image)) for image in images)
            text = f"I see {len(images)} image(s): {sizes} bytes." + (f" {text}" if text else "")
        answer_format = payload.get("format")
        if answer_format == "json":
            text = json.dumps({"answer": text}, ensure_ascii=False)
        elif isinstance(answer_format, dict):
            text = json.dumps(schema_instance(answer_format, text), ensure_ascii=False)
        calls = self._tool_calls(payload, prompt) if chat and not results else []
        content = [] if calls else re.findall(r"\S+\s*", text) or [text]
        return Answer(content=content, thinking=self._thoughts(payload, model, prompt), tool_calls=calls)

    def _tool_calls(self, payload: dict[str, Any], prompt: str) -> list[dict[str, Any]]:
        """The scripted `tool_calls`, or with `tool_marker` in the prompt a call of the tool it names (or the first)."""
        tools = [t for t in payload.get("tools") or () if isinstance(t, dict)]
        if not tools:
            return []
        scripted = self.tool_calls
        if scripted is None and self.tool_marker and self.tool_marker in prompt:
            named = re.search(re.escape(self.tool_marker) + r":([\w.-]+)", prompt)
            functions = [t.get("function") or {} for t in tools]
            chosen = next((f for f in functions if named and f.get("name") == named.group(1)), functions[0])
            arguments = schema_instance(chosen.get("parameters") or {"type": "object"}, None)
            scripted = [{"name": chosen.get("name", ""), "arguments": arguments}]
        return [tool_call(index, call) for index, call in enumerate(scripted or ())]

    def _thoughts(self, payload: dict[str, Any], model: str, prompt: str) -> list[str]:
        """Thinking pieces when the model thinks: it has "thinking" and `think` is not false (Ollama's default)."""
        think = payload.get("think")
        if "thinking" not in self.capabilities_of(model) or think is False:
            return []
        level = think if isinstance(think, str) else "medium"  # Ollama reads `true` as "medium"
        text = self.thinking if self.thinking is not None else f"Thinking ({level}) about: {prompt}"
        return re.findall(r"\S+\s*", text) or [text]

    async def _send_line(self, send: Send, model: str, event: dict[str, Any]) -> None:
        line = orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE)
        pieces = [line[i : i + 3] for i in range(0, len(line), 3)] if model == "split:latest" else [line]
        for piece in pieces:
            await send({"type": "http.response.body", "body": piece, "more_body": True})


async def _held(gate: threading.Event, receive: Receive) -> bool:
    """Wait until the test sets `gate` (True), or the client leaves first (False)."""
    gone, watcher = _watch_for_disconnect(receive)
    try:
        # A threading.Event, set from the test's thread: looked at between short waits for the client leaving.
        while not gate.is_set():
            try:
                await asyncio.wait_for(gone.wait(), 0.01)
            except TimeoutError:
                continue
            return False
    finally:
        watcher.cancel()
    return True


def _watch_for_disconnect(receive: Receive) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """An event set when the client leaves (like Ollama, the fake only notices by reading), and its task."""
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    return gone, asyncio.create_task(watch())


def _token_line(payload: dict[str, Any], model: str, token: str) -> dict[str, Any]:
    if payload.get("chat"):
        return {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": token}, "done": False}
    return {"model": model, "created_at": _now(), "response": token, "done": False}


def _piece_line(payload: dict[str, Any], model: str, kind: str, value: Any) -> dict[str, Any]:
    """One streamed line: a content token (as before), a thinking token, or the tool calls."""
    if kind == "content":
        return _token_line(payload, model, value)
    if payload.get("chat"):
        message: dict[str, Any] = {"role": "assistant", "content": "", kind: value}
        return {"model": model, "created_at": _now(), "message": message, "done": False}
    return {"model": model, "created_at": _now(), "response": "", kind: value, "done": False}


def _gathered(final: dict[str, Any], payload: dict[str, Any], answer: Answer) -> dict[str, Any]:
    """The `stream: false` object: the done line with the thinking and tool calls gathered in, as Ollama does."""
    thinking = "".join(answer.thinking)
    if not payload.get("chat"):
        return {**final, "thinking": thinking} if thinking else final
    message = dict(final["message"])
    if thinking:
        message["thinking"] = thinking
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    return {**final, "message": message}


def _trailing_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tool results that end the conversation (what the model would answer from), oldest first."""
    results: list[dict[str, Any]] = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "tool":
            break
        results.insert(0, message)
    return results


def _images(payload: dict[str, Any]) -> list[Any]:
    """The images of a request: generate's `images`, or those of every chat message, in order."""
    if not payload.get("chat"):
        return list(payload.get("images") or ())
    return [image for m in payload.get("messages") or () if isinstance(m, dict) for image in m.get("images") or ()]


def _unreadable(payload: dict[str, Any]) -> str | None:
    """Ollama's 400 for a body its request type cannot hold: keep_alive, think, or an image that is not base64."""
    try:
        keep_alive_seconds(payload.get("keep_alive"))
    except ValueError as exc:
        return str(exc)
    refused = think_error(payload.get("think"))
    if refused is not None:
        return refused
    return next((error for image in _images(payload) if (error := base64_error(image)) is not None), None)


def _digest(name: str) -> str:
    """A model's digest as Ollama lists it: 64 hex digits (here sha256 of the name)."""
    return hashlib.sha256(name.encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _object_of(body: bytes) -> dict[str, Any] | None:
    """A management request's JSON object; None for a body that is not one (Ollama answers 400)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def _model_of(body: bytes) -> object:
    """The `model` a management request names; None for a body that is not a JSON object."""
    payload = _object_of(body)
    return payload.get("model") if payload is not None else None


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message: Message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    await _respond(send, status, orjson.dumps(body), b"application/json; charset=utf-8")


def main() -> None:
    """Serve the fake on a loopback port: `python -m tests.support.fake_ollama --port 11434 [--delay 0.05]`."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--fast", action="store_true", help="bare asyncio server for benchmarks (fake_ollama_fast)")
    args = parser.parse_args()
    if args.fast:
        import uvloop

        from tests.support.fake_ollama_fast import serve

        uvloop.run(serve("127.0.0.1", args.port))
        return
    uvicorn.run(FakeOllama(delay=args.delay), host="127.0.0.1", port=args.port, lifespan="off", log_level="warning")


if __name__ == "__main__":
    main()
