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
"""

import asyncio
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import Message, Receive, Scope, Send

DEFAULT_MODELS = ["tinyllama:1.1b-chat", "llama3:latest"]
SPECIAL_MODELS = [
    "slow:latest", "split:latest", "fail-500:latest", "error-line:latest", "no-done:latest",
    "garbage:latest", "break:latest", "hang:latest", "busy:latest", "stall:latest", "stall-headers:latest",
    "drip:latest",
]  # fmt: skip


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
        # Cleared by a test to hold load requests (model warm-up) until it sets it again.
        self.loaded = threading.Event()
        self.loaded.set()
        # Likewise for pulls: cleared, a pull stops at 50% of its first layer until it is set.
        self.pulled = threading.Event()
        self.pulled.set()
        self._changed = threading.Condition()

    @property
    def active(self) -> int:
        return self.started - self.finished - self.disconnects

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
        if path == "/" and method in ("GET", "HEAD"):
            await _respond(send, 200, b"Ollama is running", b"text/plain")
        elif path == "/api/version":
            await _json(send, 200, {"version": "0.0.0-fake"})
        elif path == "/api/tags":
            models = [{"name": name, "model": name, "size": 1000 + i, "modified_at": "2026-01-01T00:00:00Z",
                       "details": {"family": "fake"}} for i, name in enumerate(self.models)]  # fmt: skip
            await _json(send, 200, {"models": models})
        elif path == "/api/ps":
            first = self.models[0]
            await _json(send, 200, {"models": [{"name": first, "model": first, "size": 1000, "size_vram": 1000,
                                                "details": {"family": "fake"}}]})  # fmt: skip
        elif path == "/api/show" and method == "POST":
            model = _model_of(await _read_body(receive))
            if model in self.models:
                shown = {"modelfile": f"FROM {model}", "parameters": "", "template": "{{ .Prompt }}",
                         "details": {"family": "fake"}, "model_info": {}, "capabilities": ["completion"]}  # fmt: skip
                await _json(send, 200, shown)
            else:
                await _json(send, 404, {"error": f"model '{model}' not found"})
        elif path == "/api/delete" and method == "DELETE":
            model = _model_of(await _read_body(receive))
            if model in self.models:
                self.models.remove(model)
                await _respond(send, 200, b"", b"application/json")
            else:
                await _json(send, 404, {"error": f"model '{model}' not found"})
        elif path == "/api/pull" and method == "POST":
            payload = _object_of(await _read_body(receive))
            if payload is not None and isinstance(payload.get("model"), str):
                await self._pull(payload, receive, send)
            else:
                await _json(send, 400, {"error": "invalid request body"})
        elif path == "/api/generate" and method == "POST":
            self.client_ports.append(scope["client"][1])
            await self._generate(orjson.loads(await _read_body(receive)), receive, send)
        elif path == "/api/chat" and method == "POST":
            # The same behaviours as /api/generate, answering the last user message in chat's line format.
            payload = orjson.loads(await _read_body(receive))
            user = [m.get("content", "") for m in payload.get("messages") or () if m.get("role") == "user"]
            await self._generate({**payload, "prompt": user[-1] if user else "", "chat": True}, receive, send)
        else:
            await _respond(send, 404, b"404 page not found", b"text/plain")

    async def _generate(self, payload: dict[str, Any], receive: Receive, send: Send) -> None:
        self.requests.append(payload)
        model = payload.get("model", "")
        if ":" not in model:
            model += ":latest"
        if model not in self.models:
            await _json(send, 404, {"error": f"model '{model}' not found, try pulling it first"})
            return
        if "prompt" not in payload:
            await self._load(model, receive, send)
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
        self._count("finished" if finished else "disconnects")

    async def _load(self, model: str, receive: Receive, send: Send) -> None:
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
        await _json(send, 200, {"model": model, "created_at": _now(), "response": "", "done": True,
                                "done_reason": "load"})  # fmt: skip

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
        if model == "slow:latest":
            words, delay = [f"w{i} " for i in range(400)], 0.02
        elif model == "drip:latest":
            words, delay = [f"d{i} " for i in range(200)], 0.05
        elif model == "stall:latest":
            # Fixed, so exactly two tokens arrive whatever the prompt is.
            words = ["s0 ", "s1 "]
        limit = options.get("num_predict")
        tokens = words[:limit] if isinstance(limit, int) and limit >= 0 else words
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})  # fmt: skip
        if model == "stall-headers:latest":
            # Headers are out, so only a first-token timeout (not a connect/response one) can end this.
            await gone.wait()
            return False
        started = time.monotonic_ns()
        for index, token in enumerate(tokens):
            if delay:
                try:
                    await asyncio.wait_for(gone.wait(), delay)
                except TimeoutError:
                    pass
            if gone.is_set():
                return False
            await self._send_line(send, model, _token_line(payload, model, token))
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
            context = " ".join(m.get("content", "") for m in messages)
            final = {
                **_token_line(payload, model, ""), "done": True,
                "done_reason": "length" if len(tokens) < len(words) else "stop",
                "total_duration": time.monotonic_ns() - started, "load_duration": 1000,
                "prompt_eval_count": len(context.split()) if context else len(words), "prompt_eval_duration": 1000,
                "eval_count": len(tokens), "eval_duration": 1000,
            }  # fmt: skip
            await self._send_line(send, model, final)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

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
