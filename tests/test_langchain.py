"""LangChain's ChatOllama (through /api/chat) and ChatOpenAI (through /v1/chat/completions) in front of the fake
Ollama: bind_tools, with_structured_output, a two-turn agent loop and a streamed tool call, as LangChain builds them.

Each test reads both legs of the wire: what LangChain sent to MiniVault (an httpx hook on its client) and what
MiniVault sent on to the fake (the fake's own record), so a field dropped or re-written on the way fails it.
"""

import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import orjson
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, SecretStr

from tests.support.dialect_servers import Gateway, fake_gateway
from tests.support.fake_ollama import FakeOllama

MODEL = "llama3"
# Keys out of alphabetical order, a nested object, a float and a non-ASCII string: what a re-encoder would change.
ARGUMENTS: dict[str, Any] = {"unit": "C", "city": "Zürich", "days": 3, "detail": {"z": 1.5, "a": [1, "x"]}}


def get_weather(city: str, unit: str) -> str:
    """Get the weather in a city.

    Args:
        city: The city to get the weather for
        unit: C or F
    """
    return f"18 {unit} in {city}"


class GetWeather(BaseModel):
    """Get the weather in a city."""

    city: str
    unit: str


class Weather(BaseModel):
    city: str
    temperature: float
    conditions: list[str]


# The tools as the fake receives them: ChatOllama's from the function's docstring (via ollama-python), ChatOpenAI's
# from the pydantic model (via convert_to_openai_tool), each in its library's key order.
FUNCTION_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city.",
        "parameters": {"type": "object", "required": ["city", "unit"],
                       "properties": {"city": {"type": "string", "description": "The city to get the weather for"},
                                      "unit": {"type": "string", "description": "C or F"}}},
    },
}  # fmt: skip
PYDANTIC_TOOL = {
    "type": "function",
    "function": {
        "name": "GetWeather",
        "description": "Get the weather in a city.",
        "parameters": {"properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                       "required": ["city", "unit"], "type": "object"},
    },
}  # fmt: skip
# The fake answers a schema with an instance whose strings are the prompt and whose numbers are the smallest allowed.
PARIS = Weather(city="Paris", temperature=0.0, conditions=["Paris"])


class Wire:
    """httpx hooks recording what a LangChain client sent to MiniVault and the JSON answers it got back."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.answers: list[dict[str, Any]] = []

    def request(self, request: httpx.Request) -> None:
        self.sent.append((request.url.path, orjson.loads(request.content)))

    def response(self, response: httpx.Response) -> None:
        # Streams are left alone: reading one here would hold its chunks back from LangChain.
        if response.headers.get("content-type", "").startswith("application/json"):
            response.read()
            self.answers.append(orjson.loads(response.content))

    @property
    def hooks(self) -> dict[str, Any]:
        return {"request": [self.request], "response": [self.response]}


@pytest.fixture(autouse=True)
def no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's LangSmith settings must not send the test traffic anywhere.
    monkeypatch.setenv("LANGCHAIN_TRACING_V2", "false")
    monkeypatch.setenv("LANGSMITH_TRACING", "false")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with fake_gateway(tmp_path_factory.mktemp("langchain") / "log.jsonl") as gateway:
        yield gateway


@pytest.fixture
def fake(gateway: Gateway) -> Iterator[FakeOllama]:
    assert gateway.fake is not None
    yield gateway.fake
    gateway.fake.tool_calls = None  # scripts are per test


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def chat_ollama(gateway: Gateway, wire: Wire) -> Iterator[ChatOllama]:
    model = ChatOllama(model=MODEL, base_url=gateway.url, client_kwargs={"timeout": 30, "event_hooks": wire.hooks})
    yield model
    # ChatOllama never closes the ollama client it builds; its pooled socket would outlive the test.
    model._client.close()


@pytest.fixture
def chat_openai(gateway: Gateway, wire: Wire) -> Iterator[ChatOpenAI]:
    with httpx.Client(event_hooks=wire.hooks) as http_client:
        yield ChatOpenAI(model=MODEL, base_url=f"{gateway.url}/v1", api_key=SecretStr("unused"), max_retries=0,
                         timeout=30, http_client=http_client)  # fmt: skip


def chats(fake: FakeOllama) -> list[dict[str, Any]]:
    """The chat requests that reached the fake, in order."""
    return [body for path, body in fake.received if path == "/api/chat"]


def last_raw_chat(fake: FakeOllama) -> bytes:
    return [body for path, body in fake.raw_requests if path == "/api/chat"][-1]


def merged(chunks: Sequence[BaseMessage]) -> AIMessageChunk:
    """The chunks of a stream added up, as LangChain's agents do."""
    pieces = [chunk for chunk in chunks if isinstance(chunk, AIMessageChunk)]
    assert pieces and len(pieces) == len(chunks)
    total = pieces[0]
    for piece in pieces[1:]:
        total = total + piece
    return total


def script(fake: FakeOllama, name: str) -> None:
    fake.tool_calls = [{"name": name, "arguments": ARGUMENTS, "id": "call_1"}]


# --- bind_tools ----------------------------------------------------------------------------------------------


def test_chat_ollama_bind_tools_gives_the_scripted_call(fake: FakeOllama, chat_ollama: ChatOllama, wire: Wire) -> None:
    script(fake, "get_weather")

    answer = chat_ollama.bind_tools([get_weather]).invoke("What is the weather in Zürich?")

    assert isinstance(answer, AIMessage)
    assert answer.content == ""
    assert answer.response_metadata["done_reason"] == "stop"
    [call] = answer.tool_calls
    # langchain-ollama draws its own uuid4 for every call rather than keep Ollama's id.
    assert uuid.UUID(call["id"] or "").version == 4
    assert call == {"name": "get_weather", "args": ARGUMENTS, "id": call["id"], "type": "tool_call"}
    assert list(call["args"]) == ["unit", "city", "days", "detail"]
    assert [path for path, _ in wire.sent] == ["/api/chat"]
    assert wire.sent[0][1]["tools"] == [FUNCTION_TOOL]
    sent = chats(fake)[-1]
    assert (sent["tools"], sent["messages"]) == (
        [FUNCTION_TOOL],
        [{"role": "user", "content": "What is the weather in Zürich?"}],
    )


def test_chat_openai_bind_tools_with_a_pydantic_tool_gives_the_scripted_call(
    fake: FakeOllama, chat_openai: ChatOpenAI, wire: Wire
) -> None:
    script(fake, "GetWeather")

    answer = chat_openai.bind_tools([GetWeather]).invoke("What is the weather in Zürich?")

    assert isinstance(answer, AIMessage)
    assert answer.content == ""
    assert answer.response_metadata["finish_reason"] == "tool_calls"
    assert answer.tool_calls == [{"name": "GetWeather", "args": ARGUMENTS, "id": "call_1", "type": "tool_call"}]
    assert list(answer.tool_calls[0]["args"]) == ["unit", "city", "days", "detail"]
    assert [path for path, _ in wire.sent] == ["/v1/chat/completions"]
    assert wire.sent[0][1]["tools"] == [PYDANTIC_TOOL]
    sent = chats(fake)[-1]
    assert (sent["tools"], sent["messages"]) == (
        [PYDANTIC_TOOL],
        [{"role": "user", "content": "What is the weather in Zürich?"}],
    )


# --- with_structured_output ----------------------------------------------------------------------------------


def test_chat_ollama_structured_output_sends_the_schema_as_format(
    fake: FakeOllama, chat_ollama: ChatOllama, wire: Wire
) -> None:
    answer = chat_ollama.with_structured_output(Weather).invoke("Paris")

    assert answer == PARIS
    assert type(answer) is Weather
    # ChatOllama's default method, json_schema, sends the model's JSON schema itself as Ollama's `format`.
    assert wire.sent[-1][1]["format"] == Weather.model_json_schema()
    assert chats(fake)[-1]["format"] == Weather.model_json_schema()
    assert "tools" not in chats(fake)[-1]


def test_chat_openai_structured_output_sends_response_format_which_becomes_ollamas_format(
    fake: FakeOllama, chat_openai: ChatOpenAI, wire: Wire
) -> None:
    answer = chat_openai.with_structured_output(Weather).invoke("Paris")

    assert answer == PARIS
    assert type(answer) is Weather
    # The SDK makes the schema strict (no other properties); MiniVault hands that schema to Ollama as `format`.
    strict = {**Weather.model_json_schema(), "additionalProperties": False}
    assert wire.sent[-1][1]["response_format"] == {
        "type": "json_schema", "json_schema": {"schema": strict, "name": "Weather", "strict": True},
    }  # fmt: skip
    assert chats(fake)[-1]["format"] == strict
    assert "tools" not in chats(fake)[-1]


# --- a two-turn agent loop -----------------------------------------------------------------------------------


def test_chat_ollama_agent_loop_sends_the_calls_arguments_back_in_order(
    fake: FakeOllama, chat_ollama: ChatOllama, wire: Wire
) -> None:
    model = chat_ollama.bind_tools([get_weather])
    history: list[BaseMessage] = [HumanMessage("What is the weather in Zürich?")]
    script(fake, "get_weather")
    before = len(chats(fake))

    first = model.invoke(history)
    assert isinstance(first, AIMessage)
    [call] = first.tool_calls
    fake.tool_calls = None
    history += [first, ToolMessage("18 C", tool_call_id=call["id"] or "")]
    second = model.invoke(history)

    assert list(call["args"]) == ["unit", "city", "days", "detail"]
    # Neither langchain-ollama nor ollama-python (whose Message has no tool_call_id) names the tool a result
    # answers, so the fake reads it as Ollama would: an unnamed tool.
    assert second.content == "tool said: 18 C"
    assert second.tool_calls == []
    assert wire.sent[-1][1]["messages"][1] == {"role": "assistant", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": ARGUMENTS}}]}  # fmt: skip
    # The arguments go back to Ollama as the fake wrote them: same keys, same order, same values, to the byte.
    raw = last_raw_chat(fake)
    assert raw.count(b'"arguments":' + orjson.dumps(ARGUMENTS)) == 1
    assert orjson.loads(raw)["messages"] == [
        {"role": "user", "content": "What is the weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                           "arguments": ARGUMENTS}}]},
        {"role": "tool", "content": "18 C"},
    ]  # fmt: skip
    assert len(chats(fake)) == before + 2
    assert chats(fake)[-1]["tools"] == [FUNCTION_TOOL]


def test_chat_openai_agent_loop_sends_langchains_arguments_text_through_unchanged(
    fake: FakeOllama, chat_openai: ChatOpenAI, wire: Wire
) -> None:
    model = chat_openai.bind_tools([GetWeather])
    history: list[BaseMessage] = [HumanMessage("What is the weather in Zürich?")]
    script(fake, "GetWeather")
    before = len(chats(fake))

    first = model.invoke(history)
    assert isinstance(first, AIMessage)
    fake.tool_calls = None
    history += [first, ToolMessage("18 C", tool_call_id="call_1")]
    second = model.invoke(history)

    # What the SDK received: the fake's object as MiniVault writes it, compact JSON in the fake's key order.
    received = wire.answers[0]["choices"][0]["message"]["tool_calls"]
    function = {"name": "GetWeather", "arguments": orjson.dumps(ARGUMENTS).decode()}
    assert received == [{"id": "call_1", "type": "function", "function": function}]
    # langchain-openai keeps only the parsed args and writes them again with json.dumps (", " and ": ") for the
    # next turn; MiniVault passes that text on to Ollama byte for byte, in the same key order.
    rewritten = json.dumps(ARGUMENTS, ensure_ascii=False)
    assert wire.sent[-1][1]["messages"][1]["tool_calls"] == [
        {"type": "function", "id": "call_1", "function": {"name": "GetWeather", "arguments": rewritten}}
    ]
    raw = last_raw_chat(fake)
    assert raw.count(b'"arguments":' + rewritten.encode()) == 1
    assert list(orjson.loads(raw)["messages"][1]["tool_calls"][0]["function"]["arguments"]) == list(ARGUMENTS)
    assert orjson.loads(raw)["messages"][2] == {
        "role": "tool", "content": "18 C", "tool_name": "GetWeather", "tool_call_id": "call_1",
    }  # fmt: skip
    # MiniVault names the tool from the call the result answers, so the fake answers from it.
    assert second.content == "GetWeather said: 18 C"
    assert second.response_metadata["finish_reason"] == "stop"
    assert len(chats(fake)) == before + 2


# --- streaming with tools ------------------------------------------------------------------------------------


def test_chat_ollama_streams_a_tool_call(fake: FakeOllama, chat_ollama: ChatOllama, wire: Wire) -> None:
    script(fake, "get_weather")

    chunks = list(chat_ollama.bind_tools([get_weather]).stream("Weather?"))

    total = merged(chunks)
    [call] = total.tool_calls
    assert uuid.UUID(call["id"] or "").version == 4
    assert call == {"name": "get_weather", "args": ARGUMENTS, "id": call["id"], "type": "tool_call"}
    # Ollama sends a call whole: one chunk carries it, its arguments as langchain-ollama writes them.
    assert total.tool_call_chunks == [{"name": "get_weather", "args": json.dumps(ARGUMENTS), "id": call["id"],
                                       "index": None, "type": "tool_call_chunk"}]  # fmt: skip
    assert [len(chunk.tool_call_chunks) for chunk in chunks if isinstance(chunk, AIMessageChunk)] == [1, 0, 0]
    assert total.content == ""
    assert total.response_metadata["done_reason"] == "stop"
    assert wire.sent[-1][1]["stream"] is True
    assert chats(fake)[-1]["tools"] == [FUNCTION_TOOL]


def test_chat_openai_streams_a_tool_call(fake: FakeOllama, chat_openai: ChatOpenAI, wire: Wire) -> None:
    script(fake, "GetWeather")

    chunks = list(chat_openai.bind_tools([GetWeather]).stream("Weather?"))

    total = merged(chunks)
    assert total.tool_calls == [{"name": "GetWeather", "args": ARGUMENTS, "id": "call_1", "type": "tool_call"}]
    # The call arrives in one frame (Ollama sends it whole), its arguments the text MiniVault wrote.
    assert total.tool_call_chunks == [{"name": "GetWeather", "args": orjson.dumps(ARGUMENTS).decode(),
                                       "id": "call_1", "index": 0, "type": "tool_call_chunk"}]  # fmt: skip
    assert [len(chunk.tool_call_chunks) for chunk in chunks if isinstance(chunk, AIMessageChunk)] == [1, 0, 0]
    assert total.content == ""
    assert total.response_metadata["finish_reason"] == "tool_calls"
    assert wire.sent[-1][1]["stream"] is True
    assert wire.answers == []  # an event stream, not a JSON answer
    assert chats(fake)[-1]["tools"] == [PYDANTIC_TOOL]
