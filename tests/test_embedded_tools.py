"""The embedded backend beyond plain text: tools (emulated where the model's template has none, passed on where
llama.cpp parses them), structured output as the engine's grammar, a conversation fitted to the context, the
capabilities the bundled model lacks refused, load-time options named. First with respx standing in for the
engine, then against the real engine and SmolLM2-135M through MiniVault's OpenAI dialect."""

import base64
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import openai
import pytest
import respx

from app.backends.base import ChatInput, Completion
from app.backends.embedded import EmbeddedBackend, EmbeddedEngine, TemplateCost
from app.backends.embedded_features import ContextOverflow, tool_call_schema, tool_instruction
from app.dialects.relay import IGNORED_OPTIONS_HEADER
from app.errors import BackendError, InvalidRequest
from app.vocabulary import Event, Image, Message, OutputFormat, Tool, ToolCall, ToolCallDelta, ToolChoice
from tests.support.dialect_servers import Gateway

URL = "http://engine.test"
MODEL = "smol"
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = Tool("get_weather", "Get the weather in a city", WEATHER_PARAMETERS)
TIME = Tool("now", None, {"type": "object", "properties": {}})
WEATHER_SPEC = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS, "description": "Get the weather in a city"},
}
TIME_SPEC = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


# --- a scripted engine


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def chunks(*texts: str, finish: str = "stop") -> bytes:
    """The engine's stream of `texts` as content deltas, its finish and usage."""
    deltas = [{"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]} for text in texts]
    end = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": len(texts)}}
    return sse(*deltas, end, usage, b"[DONE]")


class Engine:
    """respx routes that answer like llama.cpp's server: /props, a word-counting /tokenize, /apply-template and
    the chat stream, each request recorded."""

    # The fake template: 10 tokens once, 3 around each message (so per_message 3 + 2 margin, fixed 10 + 2).
    TEMPLATE = TemplateCost(per_message=5, fixed=12, native_tools=False)

    def __init__(self, mock: respx.MockRouter, answer: bytes, *, native_tools: bool = False) -> None:
        self.props = mock.get("/props").respond(
            200, json={"chat_template_caps": {"supports_tool_calls": native_tools, "supports_tools": native_tools}}
        )
        self.tokenized: list[str] = []
        self.tokenize = mock.post("/tokenize").mock(side_effect=self._tokenize)
        self.template = mock.post("/apply-template").mock(side_effect=self._apply_template)
        self.chat = mock.post("/v1/chat/completions").respond(
            200, content=answer, headers={"content-type": "text/event-stream"}
        )
        self.completions = mock.post("/v1/completions").respond(
            200, content=answer, headers={"content-type": "text/event-stream"}
        )

    def _tokenize(self, request: httpx.Request) -> httpx.Response:
        content = json.loads(request.content)["content"]
        self.tokenized.append(content)
        return httpx.Response(200, json={"tokens": list(range(len(content.split())))})

    @staticmethod
    def _apply_template(request: httpx.Request) -> httpx.Response:
        messages = json.loads(request.content)["messages"]
        return httpx.Response(200, json={"prompt": "T " * 10 + "".join(f"M M M {m['content']} " for m in messages)})

    @property
    def sent(self) -> dict[str, Any]:
        """The last body the chat route got."""
        body: dict[str, Any] = json.loads(self.chat.calls.last.request.content)
        return body


def mocked() -> respx.MockRouter:
    # Each test uses some of the engine's routes, not all.
    return respx.mock(base_url=URL, assert_all_called=False)


def engine_stub(context: int = 1024) -> EmbeddedEngine:
    engine = EmbeddedEngine(Path(f"{MODEL}.gguf"), parallel=1, context=context, threads=1)
    engine.address = URL
    return engine


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=URL) as http:
        yield http


async def collect(backend: EmbeddedBackend, chat: ChatInput) -> tuple[list[Event], Completion]:
    completion = Completion()
    return [event async for event in backend.stream(chat, completion)], completion


def ask(*messages: Message, **asks: Any) -> ChatInput:
    return ChatInput(MODEL, messages, asks.pop("options", {"num_predict": 32}), conversation=True, **asks)


USER = Message("user", "What is the weather in Paris?")
SYSTEM = Message("system", "Be brief.")


# --- capabilities


@pytest.mark.anyio
async def test_the_embedded_model_offers_completion_and_tools_only(client: httpx.AsyncClient) -> None:
    assert await EmbeddedBackend(client, engine_stub()).capabilities(MODEL) == frozenset({"completion", "tools"})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("asks", "message"),
    [
        ({"think": True}, 'model "smol" does not support thinking'),
        ({"think": "high"}, 'model "smol" does not support thinking'),
        ({"images": (Image(PNG, "image/png"),)}, 'model "smol" does not support vision'),
    ],
)
async def test_thinking_and_images_are_refused_naming_the_capability_before_the_engine_is_asked(
    client: httpx.AsyncClient, asks: dict[str, Any], message: str
) -> None:
    images = asks.pop("images", ())
    with mocked() as mock:
        engine = Engine(mock, chunks("x"))
        with pytest.raises(InvalidRequest) as raised:
            await collect(EmbeddedBackend(client, engine_stub()), ask(Message("user", "hi", images=images), **asks))
    assert raised.value.message == message
    assert raised.value.status == 400  # a valid body the model cannot answer: 400 on every API
    assert (engine.chat.call_count, engine.props.call_count) == (0, 0)


@pytest.mark.anyio
async def test_a_suffix_is_refused_as_no_fill_in_the_middle(client: httpx.AsyncClient) -> None:
    with mocked() as mock:
        engine = Engine(mock, chunks("x"))
        with pytest.raises(InvalidRequest) as raised:
            chat = ChatInput.single(MODEL, "def f(", None, None, suffix="):\n    return 1", raw=True)
            await collect(EmbeddedBackend(client, engine_stub()), chat)
    assert raised.value.message.startswith(
        'model "smol" does not support insert: the embedded model has no fill-in-the-middle tokens'
    )
    assert raised.value.param == "suffix"
    assert engine.chat.call_count == engine.completions.call_count == 0


@pytest.mark.anyio
async def test_think_false_asks_nothing_of_the_model(client: httpx.AsyncClient) -> None:
    with mocked() as mock:
        engine = Engine(mock, chunks("Hi"))
        events, _ = await collect(EmbeddedBackend(client, engine_stub()), ask(USER, think=False))
    assert events == ["Hi"]
    assert "reasoning_format" not in engine.sent and "chat_template_kwargs" not in engine.sent


# --- options


@pytest.mark.anyio
async def test_engine_options_are_passed_on_and_load_time_ones_named(client: httpx.AsyncClient) -> None:
    options = {
        "num_predict": 7, "temperature": 0.1, "top_k": 5, "mirostat": 2, "num_keep": 4, "seed": 3,
        "num_ctx": 8192, "num_gpu": 1, "num_thread": 2, "unknown_knob": True,
    }  # fmt: skip
    with mocked() as mock:
        engine = Engine(mock, chunks("Hi", " there"))
        events, completion = await collect(EmbeddedBackend(client, engine_stub()), ask(USER, options=options))

    assert events == ["Hi", " there"]
    assert completion.ignored_options == ("num_ctx", "num_gpu", "num_thread", "unknown_knob")
    assert engine.sent == {
        "model": MODEL, "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": 7, "temperature": 0.1, "top_k": 5, "mirostat": 2, "n_keep": 4, "seed": 3,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    }  # fmt: skip
    assert (completion.done_reason, completion.prompt_tokens, completion.completion_tokens) == ("stop", 40, 2)


@pytest.mark.anyio
async def test_a_plain_chat_that_surely_fits_is_not_counted(client: httpx.AsyncClient) -> None:
    with mocked() as mock:
        engine = Engine(mock, chunks("Hi"))
        backend = EmbeddedBackend(client, engine_stub())
        await backend.warm(MODEL)
        measured = engine.tokenize.call_count
        await collect(backend, ask(SYSTEM, Message("user", "word " * 150)))
        await collect(backend, ask(USER))
    assert backend._template == Engine.TEMPLATE
    assert engine.tokenize.call_count == measured  # the template once at warm-up, then nothing
    assert (engine.props.call_count, engine.template.call_count) == (1, 2)


# --- structured output


@pytest.mark.anyio
async def test_a_json_schema_becomes_the_engines_grammar_and_streams_as_it_comes(client: httpx.AsyncClient) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    with mocked() as mock:
        engine = Engine(mock, chunks('{"age"', ": 3}"))
        events, completion = await collect(
            EmbeddedBackend(client, engine_stub()), ask(USER, format=OutputFormat(schema, name="person"))
        )
    assert events == ['{"age"', ": 3}"]
    assert engine.sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": schema},
    }
    assert engine.sent["messages"] == [{"role": "user", "content": "What is the weather in Paris?"}]
    assert completion.done_reason == "stop"


@pytest.mark.anyio
async def test_any_json_is_an_object_and_a_cut_answer_says_length(client: httpx.AsyncClient) -> None:
    with mocked() as mock:
        engine = Engine(mock, chunks('{"a": [1,', finish="length"))
        events, completion = await collect(EmbeddedBackend(client, engine_stub()), ask(USER, format=OutputFormat()))
    assert engine.sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}},
    }
    # The client sees why the JSON does not parse: finish_reason / done_reason `length`, as OpenAI reports it.
    assert (events, completion.done_reason) == (['{"a": [1,'], "length")


# --- tools, emulated


@pytest.mark.anyio
async def test_a_required_call_is_constrained_offered_in_the_system_prompt_and_returned_as_a_call(
    client: httpx.AsyncClient,
) -> None:
    answer = chunks('{"tool_call": {"name": "get_weather", ', '"arguments": { "city" : "Paris" }}}')
    with mocked() as mock:
        engine = Engine(mock, answer)
        events, completion = await collect(
            EmbeddedBackend(client, engine_stub()),
            ask(SYSTEM, USER, tools=(WEATHER,), tool_choice=ToolChoice("required")),
        )

    [call] = events
    assert isinstance(call, ToolCallDelta)
    assert (call.index, call.name, call.arguments) == (0, "get_weather", '{ "city" : "Paris" }')
    assert CALL_ID.match(call.id or "")
    assert completion.done_reason == "tool_calls"
    sent = engine.sent
    assert "tools" not in sent and "tool_choice" not in sent  # the template would drop them
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "tool_call", "schema": tool_call_schema([WEATHER_SPEC], "required", None, False)},
    }
    instruction = tool_instruction([WEATHER_SPEC], "required", None, False)
    assert sent["messages"] == [
        {"role": "system", "content": f"Be brief.\n\n{instruction}"},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]


@pytest.mark.anyio
async def test_auto_may_answer_in_text_which_streams_and_the_instruction_is_the_system_prompt(
    client: httpx.AsyncClient,
) -> None:
    pieces = ('{"resp', 'onse": "Sun', "ny, I \\", '"think\\"', '."}')
    with mocked() as mock:
        engine = Engine(mock, chunks(*pieces))
        events, completion = await collect(EmbeddedBackend(client, engine_stub()), ask(USER, tools=(WEATHER, TIME)))

    # Released as far as each piece decodes (a piece ending inside an escape waits for the next).
    assert (events, completion.done_reason) == (["Sun", "ny, I ", '"think"', "."], "stop")
    schema = engine.sent["response_format"]["json_schema"]["schema"]
    assert schema == tool_call_schema([WEATHER_SPEC, TIME_SPEC], None, None, False)
    assert engine.sent["messages"][0] == {
        "role": "system",
        "content": tool_instruction([WEATHER_SPEC, TIME_SPEC], None, None, False),
    }


@pytest.mark.anyio
async def test_a_named_tool_is_the_only_call_and_parallel_calls_come_back_in_order(client: httpx.AsyncClient) -> None:
    answer = chunks('{"tool_calls": [{"name": "now", "arguments": {}}, {"name": "now", "arguments": {"tz": 1}}]}')
    with mocked() as mock:
        engine = Engine(mock, answer)
        chat = ask(USER, tools=(WEATHER, TIME), tool_choice=ToolChoice("function", "now"), parallel_tool_calls=True)
        events, _ = await collect(EmbeddedBackend(client, engine_stub()), chat)

    assert [(e.index, e.name, e.arguments) for e in events if isinstance(e, ToolCallDelta)] == [
        (0, "now", "{}"),
        (1, "now", '{"tz": 1}'),
    ]
    assert len({e.id for e in events if isinstance(e, ToolCallDelta)}) == 2
    schema = engine.sent["response_format"]["json_schema"]["schema"]
    assert schema == tool_call_schema([WEATHER_SPEC, TIME_SPEC], None, "now", True, max_calls=8)


@pytest.mark.anyio
async def test_a_format_beside_auto_tools_constrains_the_response(client: httpx.AsyncClient) -> None:
    person = {"type": "object", "properties": {"age": {"type": "integer"}}}
    with mocked() as mock:
        engine = Engine(mock, chunks('{"response": {"age": 3}}'))
        events, _ = await collect(
            EmbeddedBackend(client, engine_stub()), ask(USER, tools=(WEATHER,), format=OutputFormat(person))
        )
    assert events == ['{"age": 3}']
    assert engine.sent["response_format"]["json_schema"]["schema"]["anyOf"][1]["properties"]["response"] == person


@pytest.mark.anyio
async def test_earlier_calls_and_results_are_rendered_for_the_template_and_none_offers_nothing(
    client: httpx.AsyncClient,
) -> None:
    history = (
        USER,
        Message("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Paris"}'),)),
        Message("tool", "sunny, 21 C", tool_call_id="call_1", tool_name="get_weather"),
    )
    with mocked() as mock:
        engine = Engine(mock, chunks("It is sunny."))
        events, _ = await collect(
            EmbeddedBackend(client, engine_stub()), ask(*history, tools=(WEATHER,), tool_choice=ToolChoice("none"))
        )

    assert events == ["It is sunny."]
    assert "response_format" not in engine.sent and "tools" not in engine.sent
    assert engine.sent["messages"] == [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": '{"tool_call": {"name": "get_weather", "arguments": {"city":"Paris"}}}'},
        {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"},
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (['{"response": "Sunny and wa'], ["Sunny and wa"]),  # the part of the reply that was written
        (['{"tool_call": {"name": "get_weather", "argu'], ['{"tool_call": {"name": "get_weather", "argu']),
    ],
)
async def test_an_answer_cut_by_the_token_limit_is_what_was_written_with_length(
    client: httpx.AsyncClient, texts: list[str], expected: list[str]
) -> None:
    with mocked() as mock:
        Engine(mock, chunks(*texts, finish="length"))
        events, completion = await collect(EmbeddedBackend(client, engine_stub()), ask(USER, tools=(WEATHER,)))
    assert (events, completion.done_reason) == (expected, "length")


# --- tools, parsed by llama.cpp itself


@pytest.mark.anyio
async def test_a_template_with_tools_gets_them_and_its_parsed_calls_are_passed_on(client: httpx.AsyncClient) -> None:
    def call(index: int, **fields: Any) -> dict[str, Any]:
        return {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, **fields}]}, "finish_reason": None}]}

    answer = sse(
        call(0, id="abc", type="function", function={"name": "get_weather", "arguments": ""}),
        call(0, function={"arguments": '{"city": '}),
        call(0, function={"arguments": '"Paris"}'}),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        b"[DONE]",
    )
    history = (
        USER,
        Message("assistant", "", tool_calls=(ToolCall("abc", "get_weather", '{"city":"Rome"}'),)),
        Message("tool", "rain", tool_call_id="abc"),
        Message("user", "And Paris?"),
    )
    with mocked() as mock:
        engine = Engine(mock, answer, native_tools=True)
        chat = ask(
            *history, tools=(WEATHER,), tool_choice=ToolChoice("function", "get_weather"), parallel_tool_calls=False
        )
        events, completion = await collect(EmbeddedBackend(client, engine_stub()), chat)

    assert events == [
        ToolCallDelta(0, "abc", "get_weather", ""),
        ToolCallDelta(0, None, None, '{"city": '),
        ToolCallDelta(0, None, None, '"Paris"}'),
    ]
    assert completion.done_reason == "tool_calls"
    sent = engine.sent
    assert sent["tools"] == [WEATHER_SPEC]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False
    assert "response_format" not in sent
    assert sent["messages"][1:3] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}
            ],
        },
        {"role": "tool", "content": "rain", "tool_call_id": "abc"},
    ]


# --- the context


LONG = "word " * 300  # 300 tokens to the fake tokenizer


@pytest.mark.anyio
async def test_the_oldest_turns_go_when_the_conversation_outgrows_the_context(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    conversation = (
        SYSTEM,
        Message("user", LONG),
        Message("assistant", LONG),
        Message("user", LONG),
        Message("assistant", "short answer"),
        Message("user", "And now?"),
    )
    with mocked() as mock, caplog.at_level(logging.INFO, "app.backends.embedded"):
        engine = Engine(mock, chunks("Fine."))
        # 1024 - 100 for the answer - 12 for the template leaves 912: the system prompt (2 + 5), the newest
        # three (2 + 5, 2 + 5, 300 + 5) and one more long turn (305) fit; a third long one does not.
        events, completion = await collect(
            EmbeddedBackend(client, engine_stub(1024)), ask(*conversation, options={"num_predict": 100})
        )

    assert events == ["Fine."]
    assert completion.dropped_messages == 1
    assert [m["content"] for m in engine.sent["messages"]] == ["Be brief.", LONG, LONG, "short answer", "And now?"]
    assert "embedded: dropped the 1 oldest of 6 messages to fit the 1024-token context" in caplog.messages
    # After the template's measurement (3): counted newest first, and not past the first message that did not fit.
    assert engine.tokenized[3:] == ["Be brief.", "And now?", "short answer", LONG, LONG, LONG]


@pytest.mark.anyio
async def test_without_max_tokens_a_quarter_of_the_context_is_left_for_the_answer(client: httpx.AsyncClient) -> None:
    # 1024 - 256 - 12 = 756: the newest (305) and one long turn (305) fit, not a third.
    conversation = (Message("user", LONG), Message("assistant", LONG), Message("user", LONG))
    with mocked() as mock:
        engine = Engine(mock, chunks("Fine."))
        _, completion = await collect(EmbeddedBackend(client, engine_stub(1024)), ask(*conversation, options={}))
    assert completion.dropped_messages == 1
    assert len(engine.sent["messages"]) == 2


@pytest.mark.anyio
async def test_a_newest_message_that_cannot_fit_is_refused_before_generation(client: httpx.AsyncClient) -> None:
    with mocked() as mock:
        engine = Engine(mock, chunks("never"))
        with pytest.raises(ContextOverflow) as raised:
            await collect(EmbeddedBackend(client, engine_stub(512)), ask(SYSTEM, Message("user", "word " * 600)))
    # 512 - 32 (max_tokens) - 12 leaves 468; the system prompt (2 + 5) and the message (600 + 5) need 612.
    assert (raised.value.needed, raised.value.budget) == (612, 468)
    assert engine.chat.call_count == 0


@pytest.mark.anyio
async def test_the_tool_instruction_counts_toward_the_context(client: httpx.AsyncClient) -> None:
    many = tuple(Tool(f"tool_{i}", "x " * 40, {"type": "object", "properties": {}}) for i in range(8))
    conversation = (Message("user", LONG), Message("assistant", "ok"), Message("user", "go"))
    with mocked() as mock:
        engine = Engine(mock, chunks('{"response": "done"}'))
        _, completion = await collect(
            EmbeddedBackend(client, engine_stub(512)), ask(*conversation, tools=many, options={"num_predict": 16})
        )
    # 512 - 16 - 12 = 484: the instruction (about 8 x 45 words) and the newest two fit, the long first turn not.
    assert completion.dropped_messages == 1
    assert engine.sent["messages"][0]["role"] == "system"
    assert [m["content"] for m in engine.sent["messages"][1:]] == ["ok", "go"]


# --- raw prompts and engine errors


@pytest.mark.anyio
async def test_a_raw_prompt_goes_to_the_completions_endpoint_without_the_template(client: httpx.AsyncClient) -> None:
    answer = sse(
        {"choices": [{"index": 0, "text": " Paris", "finish_reason": None}]},
        {"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": {"prompt_tokens": 5}},
        b"[DONE]",
    )
    with mocked() as mock:
        engine = Engine(mock, answer)
        chat = ChatInput.single(MODEL, "The capital of France is", "ignored", {"num_predict": 2}, raw=True)
        events, completion = await collect(EmbeddedBackend(client, engine_stub()), chat)
    assert (events, completion.done_reason, completion.prompt_tokens) == ([" Paris"], "length", 5)
    body = json.loads(engine.completions.calls.last.request.content)
    assert body == {
        "model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 2,
        "prompt": "The capital of France is",
    }  # fmt: skip
    assert engine.chat.call_count == 0


@pytest.mark.anyio
async def test_an_error_in_the_stream_and_a_refusal_keep_their_meaning(client: httpx.AsyncClient) -> None:
    with mocked() as mock:
        Engine(mock, sse({"error": {"message": "grammar failed"}}))
        with pytest.raises(BackendError) as broken:
            await collect(EmbeddedBackend(client, engine_stub()), ask(USER, format=OutputFormat()))
    assert broken.value.message == "the embedded engine: grammar failed"
    with mocked() as mock:
        engine = Engine(mock, b"")
        engine.chat.respond(400, json={"error": {"code": 400, "message": "JSON schema conversion failed"}})
        with pytest.raises(InvalidRequest) as refused:
            await collect(EmbeddedBackend(client, engine_stub()), ask(USER, format=OutputFormat({"type": "object"})))
    assert refused.value.message == "the embedded engine rejected the request: JSON schema conversion failed"


# --- the real engine (SmolLM2-135M) through MiniVault's OpenAI dialect: one short generation per test

GET_WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Get the weather in a city", "parameters": WEATHER_PARAMETERS},
}
PERSON = {
    "$defs": {"Colour": {"enum": ["red", "green", "blue"], "type": "string"}},
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "favourite": {"$ref": "#/$defs/Colour"},
    },
    "required": ["name", "age", "favourite"],
    "additionalProperties": False,
}


def test_the_bundled_template_has_no_tools_so_minivault_emulates_them(embedded: Gateway) -> None:
    engine = embedded.app.state.backend.engine
    props = httpx.get(f"{engine.address}/props", headers=engine.client_headers(), timeout=30).json()
    # llama.cpp would parse calls itself for a template that renders tools; SmolLM2's does not.
    assert props["chat_template_caps"]["supports_tool_calls"] is False
    assert props["default_generation_settings"]["n_ctx"] == engine.context == 1024


def test_a_required_tool_call_comes_back_as_openai_tool_calls(embedded: Gateway) -> None:
    with embedded.openai_client() as client:
        completion = client.chat.completions.create(
            model=embedded.model,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[GET_WEATHER],  # type: ignore[list-item]
            tool_choice="required",
            max_tokens=48,
            temperature=0,
        )

    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and CALL_ID.match(call.id)
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema_rs.validate(WEATHER_PARAMETERS, json.loads(call.function.arguments))  # type: ignore[union-attr]
    line = embedded.logged(completion.id.removeprefix("chatcmpl-"))
    assert line["status"] == "ok"


def test_a_text_reply_with_tools_on_offer_still_streams(embedded: Gateway) -> None:
    with embedded.openai_client() as client:
        stream = client.chat.completions.create(
            model=embedded.model,
            messages=[{"role": "user", "content": "Say hello to me."}],
            tools=[GET_WEATHER],  # type: ignore[list-item]
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        chunks = [chunk for chunk in stream if chunk.choices]

    texts = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices[0].delta.content]
    assert len(texts) >= 3  # piece by piece, not one block at the end
    assert not any(chunk.choices[0].delta.tool_calls for chunk in chunks)
    assert not "".join(texts).lstrip().startswith("{")  # the reply's text, not the constrained JSON around it
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_json_schema_answer_parses_and_validates(embedded: Gateway) -> None:
    with embedded.openai_client() as client:
        completion = client.chat.completions.create(
            model=embedded.model,
            messages=[{"role": "user", "content": "Describe a person called Ann as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            max_tokens=60,
            temperature=0,
        )

    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    jsonschema_rs.validate(PERSON, json.loads(choice.message.content or ""))


def test_a_chat_longer_than_the_context_is_answered_with_its_oldest_turns_dropped(
    embedded: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "word " * 1100},  # more tokens than the whole 1024-token context
        {"role": "assistant", "content": "That is a lot of words."},
        {"role": "user", "content": "Say hi."},
    ]
    engine = embedded.app.state.backend.engine
    # The engine itself refuses the conversation...
    direct = httpx.post(
        f"{engine.address}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 4},
        headers=engine.client_headers(),
        timeout=30,
    )
    assert direct.status_code == 400
    assert direct.json()["error"]["type"] == "exceed_context_size_error"

    # ...MiniVault keeps the system prompt and the newest turns that fit, and answers.
    with caplog.at_level(logging.INFO, "app.backends.embedded"), embedded.openai_client() as client:
        completion = client.chat.completions.create(
            model=embedded.model, messages=messages, max_tokens=4, temperature=0
        )

    [choice] = completion.choices
    assert choice.message.content
    assert "embedded: dropped the 1 oldest of 4 messages to fit the 1024-token context" in caplog.messages
    assert completion.usage is not None and completion.usage.prompt_tokens < 100  # the long turn was not sent


def test_thinking_and_an_image_are_refused_naming_the_capability(embedded: Gateway) -> None:
    pixel = base64.b64encode(PNG).decode()
    image = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}}]
    with embedded.openai_client() as client:
        with pytest.raises(openai.BadRequestError) as thinking:
            client.chat.completions.create(
                model=embedded.model, messages=[{"role": "user", "content": "hi"}], reasoning_effort="high"
            )
        with pytest.raises(openai.BadRequestError) as seeing:
            client.chat.completions.create(
                model=embedded.model,
                messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *image]}],  # type: ignore[list-item]
            )
    model = embedded.model
    assert thinking.value.body["message"] == f'model "{model}" does not support thinking'  # type: ignore[index]
    assert seeing.value.body["message"] == f'model "{model}" does not support vision'  # type: ignore[index]
    # Ollama's dialect answers the same refusal 400, in its own shape.
    refused = httpx.post(
        f"{embedded.url}/api/chat",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "think": True, "stream": False},
        timeout=30,
    )
    assert (refused.status_code, refused.json()) == (400, {"error": f'model "{model}" does not support thinking'})


def test_load_time_options_are_accepted_and_named(embedded: Gateway) -> None:
    response = httpx.post(
        f"{embedded.url}/api/chat",
        json={
            "model": embedded.model,
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_ctx": 8192, "num_thread": 2, "num_predict": 2, "temperature": 0},
            "stream": False,
        },
        timeout=30,
    )
    assert response.status_code == 200
    assert response.headers[IGNORED_OPTIONS_HEADER] == "num_ctx, num_thread"
    assert response.json()["eval_count"] <= 2
