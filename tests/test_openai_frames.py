"""OpenAI's stream frames for tool calls, as ChunkStream encodes them (the fragment frames take a fast path)."""

import orjson

from app.backends.base import ChatInput
from app.core.caller import Caller
from app.core.exchange import Exchange
from app.dialects.openai.wire import ChunkStream
from app.vocabulary import ToolCallDelta


class _Backend:
    name = "ollama"
    default_model = "m"


def frames(encoded: bytes) -> list[dict]:
    return [orjson.loads(part[6:]) for part in encoded.split(b"\n\n") if part.startswith(b"data: {")]


def test_argument_fragments_are_openais_delta_frames_for_their_own_call() -> None:
    exchange = Exchange(Caller("req1", "openai"), _Backend(), prompt="p", chat=ChatInput.single("m", "p"))  # type: ignore[arg-type]
    stream = ChunkStream(exchange, chat=True, include_usage=False)
    pieces = [ToolCallDelta(0, "call_a", "lookup", '{"a":'), ToolCallDelta(0, None, None, ' "x\\"y"'),
              ToolCallDelta(1, "call_b", "other", ""), ToolCallDelta(1, None, None, "{}"),
              ToolCallDelta(0, None, None, "}")]  # fmt: skip
    for piece in pieces:
        exchange.absorb(piece)
    encoded = [frames(stream.token(piece)) for piece in pieces]

    deltas = [frame[0]["choices"][0]["delta"] for frame in encoded]
    assert deltas == [
        {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                              "function": {"name": "lookup", "arguments": '{"a":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ' "x\\"y"'}}]},
        {"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                         "function": {"name": "other", "arguments": ""}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]},
    ]  # fmt: skip
    assert {frame[0]["id"] for frame in encoded} == {"chatcmpl-req1"}
    assert [frame[0]["choices"][0]["finish_reason"] for frame in encoded] == [None] * 5
    ends = frames(stream.end())
    assert ends[-1]["choices"][0]["finish_reason"] == "tool_calls"
