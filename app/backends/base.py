"""The interface every upstream implements, and the helpers their wire formats share."""

import base64
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx
import orjson

from app.backends.transport import failure_kind
from app.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Busy,
    InvalidRequest,
    MiniVaultError,
    MissingCapability,
)
from app.vocabulary import Event, Message, OutputFormat, Think, Tool, ToolChoice

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ChatInput:
    """What the upstream is asked, in no backend's dialect (app/vocabulary.py): messages, a model, options,
    and what the answer may or must hold (tools, a format, thinking).

    `messages` is `system` first (when there is one), earlier turns, then the newest message.
    `conversation` False means one plain prompt, which Ollama answers with /api/generate (there
    `suffix` asks for fill-in-the-middle and `raw` sends the prompt without the model's template).
    """

    model: str
    messages: tuple[Message, ...]
    options: dict[str, Any] | None = None
    conversation: bool = False
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    # None: the backend's default (OpenAI's servers: parallel calls allowed).
    parallel_tool_calls: bool | None = None
    format: OutputFormat | None = None
    think: Think = None
    suffix: str | None = None
    raw: bool = False
    # Ollama's: how long the model stays loaded after this request (`0` unloads it); None leaves it.
    keep_alive: str | int | float | None = None

    @classmethod
    def single(cls, model: str, prompt: str, system: str | None = None, options: dict[str, Any] | None = None,
               **asks: Any) -> "ChatInput":  # fmt: skip
        """One prompt, with its system prompt, outside any conversation; `asks` are the other fields."""
        user = Message("user", prompt, images=asks.pop("images", ()))
        messages = (Message("system", system), user) if system is not None else (user,)
        return cls(model, messages, options, **asks)

    @property
    def prompt(self) -> str:
        return self.messages[-1].content

    @property
    def system(self) -> str | None:
        first = self.messages[0]
        return first.content if first.role == "system" else None

    @property
    def plain(self) -> bool:
        """Text in, text out: nothing beyond the messages' text and the options (the fast path)."""
        return not (self.tools or self.format or self.think or self.suffix or self.raw) and all(
            not (m.images or m.tool_calls or m.role == "tool") for m in self.messages
        )


@dataclass(slots=True)
class Completion:
    """What the upstream reports once it finishes: why it stopped and the token counts."""

    done_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # With several hosts: the one that answered (the pool sets it).
    host: str | None = None
    # Options the backend could not apply per request (load-time ones, as `num_ctx` on a llama.cpp server):
    # set before the first event, so they can be named in the response's X-MiniVault-Ignored-Options.
    ignored_options: tuple[str, ...] = ()
    # Messages left out to fit the model's context (the oldest first, the system prompt kept).
    dropped_messages: int = 0


# Capabilities, in Ollama's words (its /api/show `capabilities`): what a model can be asked for.
COMPLETION, TOOLS, VISION, THINKING, INSERT, EMBEDDING = (
    "completion",
    "tools",
    "vision",
    "thinking",
    "insert",
    "embedding",
)


def required_capabilities(chat: ChatInput) -> frozenset[str]:
    """What answering `chat` needs of the model, beyond text: tools, vision, thinking, insert (a suffix)."""
    if chat.plain:
        return frozenset()
    needs = set()
    if chat.tools and (chat.tool_choice is None or chat.tool_choice.mode != "none"):
        needs.add(TOOLS)
    if any(m.images for m in chat.messages):
        needs.add(VISION)
    if chat.think:  # False and None ask for nothing
        needs.add(THINKING)
    if chat.suffix:
        needs.add(INSERT)
    return frozenset(needs)


def check_capabilities(chat: ChatInput, has: frozenset[str]) -> None:
    """Refuse `chat` with a 400 naming what its model lacks, in Ollama's words (`model "x" does not support tools`)."""
    missing = required_capabilities(chat) - has
    if missing:
        raise MissingCapability(f'model "{chat.model}" does not support {" or ".join(sorted(missing))}')


@dataclass(slots=True)
class ModelInfo:
    name: str
    size: int | None = None
    modified_at: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class BackendStatus:
    """A probe of the upstream: can it be reached, and does it have the default model."""

    reachable: bool
    model_available: bool
    reason: str | None = None


class Backend(Protocol):
    """One upstream LLM: streams the answer's events and fills in a Completion at the end."""

    name: str
    url: str
    default_model: str

    def stream(self, chat: ChatInput, completion: Completion) -> AsyncGenerator[Event, None]:
        """Yield the answer's events as they arrive (text as `str`); raise MiniVaultError subclasses on failure.

        Closing the iterator early must close the upstream request, so generation stops.
        """
        ...

    async def list_models(self) -> list[ModelInfo]:
        """The models the upstream can serve."""
        ...

    async def capabilities(self, model: str) -> frozenset[str]:
        """What MiniVault will accept for `model` (COMPLETION, TOOLS, VISION, ...), as the upstream reports it."""
        ...

    async def warm(self, model: str) -> None:
        """Have the upstream load `model` now, so the first prompt does not wait for it."""
        ...

    async def probe(self, seconds: float) -> BackendStatus:
        """Check reachability and the default model within `seconds`; never raises."""
        ...


@runtime_checkable
class SupportsPull(Protocol):
    """A backend that can download models on request (Ollama)."""

    def pull(self, model: str) -> AsyncGenerator[dict[str, Any], None]:
        """Progress events until `{"status": "success"}`; raise MiniVaultError on failure."""
        ...


@runtime_checkable
class SupportsForward(Protocol):
    """A backend that speaks Ollama's API itself, so MiniVault can pass its other routes through."""

    async def forward(self, method: str, path: str, body: bytes) -> httpx.Response:
        """The upstream's streaming response to `method path` with `body`; the caller closes it."""
        ...


@dataclass(frozen=True, slots=True)
class Upstream:
    """How error messages name an upstream and tell the user to start it."""

    label: str
    url: str
    start_hint: str


def split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """The URL without its `user:password@`, and the HTTP basic-auth header that carries them instead.

    Kept out of the client's URL: httpx turns them into a header itself, which aiohttp then refuses
    next to the credentials still in the URL (every prompt a 500), and a URL travels into messages and logs.
    """
    parsed = httpx.URL(url)
    if not parsed.userinfo:
        return url, {}
    token = base64.b64encode(f"{parsed.username}:{parsed.password}".encode()).decode("ascii")
    return str(parsed.copy_with(userinfo=b"")), {"Authorization": f"Basic {token}"}


class HttpBackend:
    """What the HTTP backends share: the pooled client, the request and its status handling.

    Each subclass keeps only its wire format: the payload it sends and the lines it parses.
    """

    name: str
    _JSON = {"Content-Type": "application/json"}

    def __init__(self, client: httpx.AsyncClient, url: str, default_model: str, upstream: Upstream) -> None:
        self._client = client
        self.url = url
        self.default_model = default_model
        self._upstream = upstream

    @asynccontextmanager
    async def _post_stream(self, path: str, payload: dict[str, Any], model: str) -> AsyncIterator[httpx.Response]:
        """POST `payload` and hand over the streaming response once it answered 200.

        Any other status becomes the matching error (`_status_error`), and transport failures,
        whenever they happen while the body is read, become the error table's.
        """
        try:
            async with self._client.stream("POST", path, content=orjson.dumps(payload), headers=self._JSON) as response:
                if response.status_code != 200:
                    raise await self._status_error(response, model)
                yield response
        except httpx.HTTPError as exc:
            raise transport_error(exc, self._upstream, self._client.timeout) from exc

    async def _status_error(self, response: httpx.Response, model: str) -> MiniVaultError:
        await response.aread()
        label, status, text = self._upstream.label, response.status_code, error_text(response)
        if status == 404:
            return await self._missing_model(model)
        if status == 400:
            return InvalidRequest(f"{label} rejected the request: {text}")
        if status in (429, 503):
            return Busy(f"{label} is busy ({status}: {text}); retry shortly{self._busy_hint}", 1)
        if status in (401, 403):
            return BackendError(f"{label} refused the credentials ({status}: {text}){self._credentials_hint}")
        return BackendError(f"{label} answered {status}: {text}")

    _busy_hint = ""
    _credentials_hint = ""

    async def list_models(self) -> list[ModelInfo]:
        raise NotImplementedError

    async def capabilities(self, model: str) -> frozenset[str]:
        return frozenset({COMPLETION})

    async def _missing_model(self, model: str) -> MiniVaultError:
        raise NotImplementedError

    async def _listed_models(self, source: str) -> str:
        """The models the upstream lists, for an error message ("unknown: SOURCE failed too" if listing fails)."""
        try:
            return ", ".join(sorted(info.name for info in await self.list_models())) or "none"
        except MiniVaultError:
            return f"unknown: {source} failed too"


class LineSplitter:
    """Cuts a byte stream into lines (newline removed); a line may span any number of chunks.

    A plain method rather than an async generator: on the per-token path every generator
    layer costs a suspension and a resumption.
    """

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines this chunk completes."""
        if b"\n" not in chunk:
            self._rest += chunk
            return []
        lines = (self._rest + chunk).split(b"\n")
        self._rest = lines.pop()
        return lines

    def close(self) -> list[bytes]:
        """The last line, when the stream did not end with a newline."""
        rest, self._rest = self._rest, b""
        return [rest] if rest else []


async def iter_json_lines(chunks: AsyncIterator[bytes], source: str) -> AsyncIterator[dict[str, Any]]:
    """Parse newline-delimited JSON (Ollama's stream format), skipping blank lines."""
    splitter = LineSplitter()
    async for chunk in chunks:
        for line in splitter.feed(chunk):
            if line and not line.isspace():
                yield load_json_object(line, source)
    for line in splitter.close():
        if not line.isspace():
            yield load_json_object(line, source)


def sse_data(line: bytes) -> bytes | None:
    """The payload of a Server-Sent Events `data:` line (OpenAI's stream format); None for other lines."""
    return line[5:].strip() if line.startswith(b"data:") else None


def load_json_object(line: bytes, source: str) -> dict[str, Any]:
    """One JSON object from a stream line, or BackendError saying what arrived instead."""
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise BackendError(f"{source} sent a line that is not JSON: {line[:200]!r}") from None
    if not isinstance(event, dict):
        raise BackendError(f"{source} sent a line that is not a JSON object: {line[:200]!r}")
    return event


def error_text(response: httpx.Response) -> str:
    """The error message inside an error response, whichever common shape it has."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or response.text[:500])


async def get_json(client: httpx.AsyncClient, path: str, upstream: Upstream) -> Any:
    """GET an upstream JSON document, with failures translated into the error table."""
    try:
        response = await client.get(path)
    except httpx.HTTPError as exc:
        raise transport_error(exc, upstream, client.timeout) from exc
    if response.status_code != 200:
        raise BackendError(f"{upstream.label} answered {response.status_code} to {path}: {error_text(response)}")
    return response.json()


def transport_error(exc: httpx.HTTPError, upstream: Upstream, timeout: httpx.Timeout) -> MiniVaultError:
    """Translate an httpx failure into the error table, naming the setting that changes it."""
    where = f"{upstream.label} at {upstream.url}"
    kind = failure_kind(exc)
    if issubclass(kind, httpx.ConnectTimeout):
        return BackendTimeout(
            f"{where} did not accept a connection within {timeout.connect} s "
            "(connect timeout; raise MINIVAULT_CONNECT_TIMEOUT)"
        )
    if issubclass(kind, httpx.ReadTimeout):
        return BackendTimeout(
            f"{where} sent nothing for {timeout.read} s (raise MINIVAULT_FIRST_TOKEN_TIMEOUT / MINIVAULT_IDLE_TIMEOUT)"
        )
    if issubclass(kind, httpx.PoolTimeout):
        return BackendTimeout(
            f"every pooled connection to {upstream.label} stayed busy for {timeout.pool} s "
            "(raise MINIVAULT_UPSTREAM_MAX_CONNECTIONS)"
        )
    if issubclass(kind, httpx.TimeoutException):
        return BackendTimeout(f"{where} timed out: {exc}")
    if issubclass(kind, httpx.ConnectError):
        return BackendUnavailable(f"cannot reach {where}: {upstream.start_hint}")
    logger.warning("%s transport error: %r", upstream.label, exc)
    return BackendError(f"the connection to {where} broke: {exc or kind.__name__}")
