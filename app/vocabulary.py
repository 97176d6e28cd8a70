"""The neutral vocabulary: what a model hears and says, in no API's dialect.

Every dialect parses its body into these values and renders these events back; every backend takes
them and yields them. A stream is `str` (a text delta: bare, the per-token fast path) or one of the
event classes below; the end of a stream (why it stopped, the token counts) is the backend's
`Completion`, filled in place.

Tool-call arguments are kept as the exact JSON text the model produced: re-serialising them changes
the next turn's prompt, and with it the model server's prompt cache.
"""

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Role = Literal["system", "user", "assistant", "tool"]
# Off (False), on (True), or an effort level; None: the model's default.
Think = bool | Literal["low", "medium", "high"] | None
EFFORTS = ("low", "medium", "high")
# Image types accepted, by their leading bytes (never by what the client says they are).
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")


@dataclass(frozen=True, slots=True)
class Image:
    """An image part: its bytes and the media type its bytes show."""

    data: bytes
    media_type: str

    def describe(self) -> dict[str, Any]:
        """What the record keeps of an image: never its bytes."""
        return {"media_type": self.media_type, "bytes": len(self.data), "sha256": hashlib.sha256(self.data).hexdigest()}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the assistant made: `arguments` is the model's JSON text, byte for byte."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Message:
    """One message: a role, its text and images, and (assistant) tool calls and thinking, or (tool) a result."""

    role: Role
    content: str = ""
    images: tuple[Image, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    # On a `tool` message: the call it answers, and the tool's name (dialects carry one or both).
    tool_call_id: str | None = None
    tool_name: str | None = None
    thinking: str | None = None


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; `parameters` is the client's JSON schema, passed on unchanged."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """`auto` (the model decides), `none`, `required` (at least one call), or `function` (the one named)."""

    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """Structured output: any JSON object (`schema` None), or JSON matching `schema`."""

    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None

    def describe(self) -> str | dict[str, Any]:
        """What the record keeps: `"json"`, or the schema itself."""
        return "json" if self.schema is None else self.schema


# --- stream events (besides `str`, a text delta) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ThinkingDelta:
    """A piece of the model's thinking, before or beside its answer."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of tool call `index`: its id and name come with its first piece, then argument fragments.

    Backends that get whole calls (Ollama) yield one delta per call, with all its arguments.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


Event = str | ThinkingDelta | ToolCallDelta


class ToolCalls:
    """Assembles tool-call deltas into whole calls, keeping the argument text as it came."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: dict[int, list[Any]] = {}

    def add(self, delta: ToolCallDelta) -> None:
        call = self._calls.get(delta.index)
        if call is None:
            self._calls[delta.index] = [delta.id, delta.name, [delta.arguments]]
            return
        if delta.id:
            call[0] = delta.id
        if delta.name:
            call[1] = delta.name
        call[2].append(delta.arguments)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def calls(self, id_prefix: str = "call") -> list[ToolCall]:
        """The calls so far, in index order; a call with no id gets `{id_prefix}_{index}`."""
        return [
            ToolCall(call_id or f"{id_prefix}_{index}", name or "", "".join(parts))
            for index, (call_id, name, parts) in sorted(self._calls.items())
        ]


def image_type(data: bytes) -> str | None:
    """The media type of an image by its leading bytes: PNG, JPEG, WebP or GIF; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    return None


# Tool-call arguments arrive as text (OpenAI) or as an object (Ollama): these move between the two.


def json_text(value: Any) -> str:
    """`value` as compact JSON, keys in their order; an integer beyond 64 bits (orjson's limit) is written too."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def json_object(text: str) -> bool:
    """Whether `text` is one JSON object (integers beyond 64 bits included; NaN and Infinity are not JSON)."""
    try:
        return isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        pass
    try:
        return isinstance(json.loads(text, parse_constant=_not_json), dict)
    except ValueError:
        return False


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")
