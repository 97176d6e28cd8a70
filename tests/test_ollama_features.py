"""Tools, structured output, images, thinking, fill in the middle and keep_alive through MiniVault's Ollama dialect
and its Ollama backend, in front of the fake Ollama, with Ollama's own Python client (and the bodies Continue and
Open WebUI send, as their sources build them)."""

import base64
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import ollama
import orjson
import pytest
import respx
from pydantic import BaseModel

from app.backends import Backend, ChatInput, Completion, OllamaBackend
from app.core.caller import Caller
from app.core.exchange import Exchange
from app.dialects.ollama.wire import LineStream
from app.errors import InvalidRequest
from app.vocabulary import Event, Image, Message, ThinkingDelta, Tool, ToolCall, ToolCallDelta, ToolChoice
from tests.support.dialect_servers import Gateway, RequestIds, fake_gateway, ollama_client
from tests.support.fake_ollama import FakeOllama


def get_weather(city: str, unit: str) -> str:
    """Get the weather in a city.

    Args:
        city: The city to get the weather for
        unit: C or F
    """
    return f"18 {unit} in {city}"


class Weather(BaseModel):
    city: str
    temperature: float
    conditions: list[str]


def tiny_png() -> bytes:
    """A real 1x1 PNG (one red pixel): signature, IHDR, IDAT and IEND with their CRCs."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


PNG = tiny_png()
# What both clients send with their bodies.
JSON = {"Content-Type": "application/json"}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A fresh fake behind MiniVault, with a model for each capability besides the defaults (completion, tools)."""
    with fake_gateway(tmp_path / "log.jsonl") as gateway:
        assert gateway.fake is not None
        gateway.fake.add_model("thinker:latest", ["completion", "thinking"])
        gateway.fake.add_model("seer:latest", ["completion", "vision"])
        gateway.fake.add_model("coder:latest", ["completion", "insert"])
        gateway.fake.add_model("plain:latest", ["completion"])
        yield gateway


@pytest.fixture
def fake(gateway: Gateway) -> FakeOllama:
    assert gateway.fake is not None
    return gateway.fake


@pytest.fixture
def ids() -> RequestIds:
    return RequestIds()


@pytest.fixture
def client(gateway: Gateway, ids: RequestIds) -> Iterator[ollama.Client]:
    with ollama_client(gateway, ids) as client:
        yield client


def generations(fake: FakeOllama) -> list[tuple[str, Any]]:
    """The generate and chat requests that reached the fake (a load or an unload included)."""
    return [(path, body) for path, body in fake.received if path in ("/api/generate", "/api/chat")]


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [orjson.loads(line) for line in response.text.splitlines()]


# --- tools ---------------------------------------------------------------------------------------------------


def test_tools_from_a_python_function_come_back_as_tool_calls(
    gateway: Gateway, fake: FakeOllama, client: ollama.Client, ids: RequestIds
) -> None:
    answer = client.chat(model="llama3", messages=[{"role": "user", "content": "CALL_TOOL weather?"}],
                         tools=[get_weather])  # fmt: skip

    assert (answer.message.content, answer.done_reason) == ("", "stop")
    assert answer.message.tool_calls is not None
    assert [(c.function.name, dict(c.function.arguments)) for c in answer.message.tool_calls] == [
        ("get_weather", {"city": "city", "unit": "unit"})  # the fake fills each string with its name
    ]
    # The tool reached Ollama as the client built it from the function's signature and docstring.
    assert fake.last_request["/api/chat"]["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city.",
         "parameters": {"type": "object", "required": ["city", "unit"],
                        "properties": {"city": {"type": "string", "description": "The city to get the weather for"},
                                       "unit": {"type": "string", "description": "C or F"}}}}}
    ]  # fmt: skip
    assert gateway.logged(ids.last)["status"] == "ok"


def test_a_streamed_tool_call_arrives_whole_in_one_line(gateway: Gateway, fake: FakeOllama) -> None:
    fake.tool_calls = [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}},
                       {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}]  # fmt: skip
    body = {"model": "llama3", "messages": [{"role": "user", "content": "two cities"}], "tools": [TOOL]}
    response = httpx.post(f"{gateway.url}/api/chat", json=body, timeout=30)

    assert response.status_code == 200
    *parts, final = ndjson(response)
    with_calls = [part["message"]["tool_calls"] for part in parts if "tool_calls" in part["message"]]
    sent = [call for line in with_calls for call in line]
    # Ollama's ids and shape, argument bytes as Ollama wrote them (the raw line keeps its key order).
    assert [(c["function"]["index"], c["function"]["name"], c["function"]["arguments"]) for c in sent] == [
        (0, "get_weather", {"city": "Paris", "unit": "C"}), (1, "get_weather", {"city": "Oslo", "unit": "F"}),
    ]  # fmt: skip
    assert all(call["id"].startswith("call_") for call in sent)
    assert b'"arguments":{"city":"Paris","unit":"C"}' in response.content
    assert (final["done"], final["done_reason"], final["message"]["content"]) == (True, "stop", "")


def test_a_two_turn_agent_loop_sends_the_calls_arguments_back_byte_for_byte(
    fake: FakeOllama, client: ollama.Client
) -> None:
    # Keys out of alphabetical order, a nested object, a float: what a re-encoder (or Go's map) would change.
    arguments = {"unit": "C", "city": "Paris", "days": 3, "detail": {"z": 1.5, "a": [1, "x"]}}
    fake.tool_calls = [{"name": "get_weather", "arguments": arguments}]
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]

    first = client.chat(model="llama3", messages=messages, tools=[get_weather])
    assert first.message.tool_calls is not None
    call = first.message.tool_calls[0]
    assert list(call.function.arguments) == ["unit", "city", "days", "detail"]
    fake.tool_calls = None
    messages += [first.message, {"role": "tool", "content": "18 degrees", "tool_name": call.function.name}]
    second = client.chat(model="llama3", messages=messages, tools=[get_weather])

    assert second.message.content == "get_weather said: 18 degrees"
    path, sent = fake.raw_requests[-1]
    assert path == "/api/chat"
    assert b'"arguments":' + orjson.dumps(arguments) in sent  # what the fake wrote in its answer, to the byte
    history = orjson.loads(sent)["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    assert history[2] == {"role": "tool", "content": "18 degrees", "tool_name": "get_weather"}


def test_open_webuis_chat_request_with_tools_keep_alive_and_options(gateway: Gateway, fake: FakeOllama) -> None:
    # As open-webui's backend (utils/payload.py convert_payload_openai_to_ollama, routers/ollama.py) posts to
    # /api/chat: OpenAI-style tool specs passed on, keep_alive lifted out of the params to the root, the model's
    # parameters in `options`; `metadata` is popped before sending.
    tools = [
        {"type": "function", "function": {"name": "search_web", "description": "Search the web",
         "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "The query"}},
                        "required": ["query"]}}},
        {"type": "function", "function": {"name": "get_current_timestamp", "description": "The time now",
         "parameters": {"type": "object", "properties": {}}}},
    ]  # fmt: skip
    options = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "num_ctx": 8192, "num_predict": 512, "seed": 42,
               "repeat_penalty": 1.1}  # fmt: skip
    body = {
        "model": "llama3:latest",
        "messages": [{"role": "system", "content": "You are helpful."},
                     {"role": "user", "content": "CALL_TOOL:get_current_timestamp what time is it?"}],
        "stream": True, "tools": tools, "options": options, "keep_alive": "30m",
    }  # fmt: skip
    response = httpx.post(f"{gateway.url}/api/chat", content=orjson.dumps(body), headers=JSON, timeout=30)

    assert response.status_code == 200
    *parts, final = ndjson(response)
    calls = [call for part in parts for call in part["message"].get("tool_calls", ())]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("get_current_timestamp", {})]
    assert final["done"] is True
    sent = fake.last_request["/api/chat"]
    assert (sent["tools"], sent["options"], sent["keep_alive"]) == (tools, options, "30m")
    assert fake.keep_alive["llama3:latest"] == "30m"


# --- structured output, thinking, images, fill in the middle -------------------------------------------------


def test_a_pydantic_schema_as_format_reaches_ollama_and_the_answer_validates(
    fake: FakeOllama, client: ollama.Client
) -> None:
    schema = Weather.model_json_schema()
    answer = client.chat(model="llama3", messages=[{"role": "user", "content": "Paris"}], format=schema)
    generated = client.generate(model="llama3", prompt="Oslo", format="json")

    assert fake.received[-2][0] == "/api/chat"
    assert fake.received[-2][1]["format"] == schema
    assert Weather.model_validate_json(answer.message.content or "") == Weather(
        city="Paris", temperature=0.0, conditions=["Paris"]
    )
    assert fake.last_request["/api/generate"]["format"] == "json"
    assert orjson.loads(generated.response or "") == {"answer": "Oslo"}


def test_think_true_returns_the_thinking_streamed_and_not(
    gateway: Gateway, fake: FakeOllama, client: ollama.Client, ids: RequestIds
) -> None:
    messages = [{"role": "user", "content": "why blue"}]
    whole = client.chat(model="thinker", messages=messages, think=True)
    *parts, final = client.chat(model="thinker", messages=messages, think=True, stream=True)
    generated = client.generate(model="thinker", prompt="why blue", think="low")
    silent = client.chat(model="thinker", messages=messages, think=False)

    assert (whole.message.thinking, whole.message.content) == ("Thinking (medium) about: why blue", "why blue")
    assert "".join(p.message.thinking or "" for p in parts) == "Thinking (medium) about: why blue"
    assert "".join(p.message.content or "" for p in parts) == "why blue"
    # Thinking comes first, in lines of its own with empty content.
    assert [bool(p.message.thinking) for p in parts] == [True] * 5 + [False] * 2
    assert final.done is True
    assert (generated.thinking, generated.response) == ("Thinking (low) about: why blue", "why blue")
    assert (silent.message.thinking, silent.message.content) == (None, "why blue")
    assert fake.last_request["/api/chat"]["think"] is False
    assert gateway.logged(ids.last)["status"] == "ok"


def test_images_reach_ollama_as_base64_and_their_sizes_come_back(fake: FakeOllama, client: ollama.Client) -> None:
    generated = client.generate(model="seer", prompt="What is this?", images=[PNG])
    chatted = client.chat(model="seer", messages=[{"role": "user", "content": "And this?", "images": [PNG, PNG]}])

    assert generated.response == f"I see 1 image(s): {len(PNG)} bytes. What is this?"
    assert chatted.message.content == f"I see 2 image(s): {len(PNG)}, {len(PNG)} bytes. And this?"
    encoded = base64.b64encode(PNG).decode()
    assert fake.last_request["/api/generate"]["images"] == [encoded]
    assert fake.last_request["/api/chat"]["messages"][0]["images"] == [encoded, encoded]


def test_generate_with_a_suffix_fills_in_the_middle(fake: FakeOllama, client: ollama.Client) -> None:
    answer = client.generate(model="coder", prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))")

    assert answer.response == "<fim prefix=19 suffix=18>"
    sent = fake.last_request["/api/generate"]
    assert (sent["prompt"], sent["suffix"]) == ("def add(a, b):\n    ", "\n\nprint(add(1, 2))")


def test_continues_autocomplete_request_with_suffix_and_raw(gateway: Gateway, fake: FakeOllama) -> None:
    # As continue's core/llm/llms/Ollama.ts (_getGenerateOptions, _getModelFileParams) posts it to /api/generate:
    # the prefix, the suffix, raw, the model-file options it has values for, keep_alive 30 minutes, streamed.
    body = {
        "model": "coder", "prompt": "def fib(n):\n    ", "suffix": "\n\nprint(fib(10))\n", "raw": True,
        "options": {"temperature": 0.01, "num_predict": 1024, "stop": ["<|endoftext|>", "\n\n\n"], "num_ctx": 8192},
        "keep_alive": 1800, "stream": True,
    }  # fmt: skip
    response = httpx.post(f"{gateway.url}/api/generate", content=orjson.dumps(body), headers=JSON, timeout=30)

    assert response.status_code == 200
    *parts, final = ndjson(response)
    # Raw mode: Ollama sends the prompt as it is (the fake echoes it); the suffix needs "insert" all the same.
    assert "".join(part["response"] for part in parts) == "def fib(n):\n    "
    assert (final["done"], final["done_reason"]) == (True, "stop")
    assert fake.last_request["/api/generate"] == body


def test_keep_alive_zero_without_a_prompt_unloads_the_model(fake: FakeOllama, client: ollama.Client) -> None:
    generated = client.generate(model="llama3", keep_alive=0)
    chatted = client.chat(model="llama3", messages=[], keep_alive="0s")
    loaded = client.generate(model="llama3", keep_alive="10m")

    assert (generated.done, generated.done_reason, generated.response) == (True, "unload", "")
    assert (chatted.done, chatted.done_reason, chatted.message.content) == (True, "unload", "")
    assert loaded.done_reason == "load"
    assert fake.unloads == 2
    assert [body.get("keep_alive") for _, body in generations(fake)[-3:]] == [0, "0s", "10m"]


# --- refused before anything is generated ----------------------------------------------------------------------


USER = {"role": "user", "content": "hi"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_INPUT: dict[str, tuple[str, dict[str, Any], str]] = {
    "tool name": (
        "/api/chat",
        {"messages": [USER], "tools": [{"type": "function", "function": {"name": "get weather!"}}]},
        "tools[0].function.name: must be 1 to 64 letters, digits, underscores or hyphens (got 'get weather!')",
    ),
    "parameters not a schema": (
        "/api/chat",
        {"messages": [USER], "tools": [{"type": "function", "function": {"name": "f", "parameters": "city"}}]},
        'tools[0].function.parameters: must be a JSON schema object, like {"type": "object", "properties": {}}',
    ),
    "parameters an invalid schema": (
        "/api/chat",
        {"messages": [USER], "tools": [{"function": {"name": "f", "parameters": {"type": "objekt"}}}]},
        "tools[0].function.parameters.type: not a valid JSON schema",
    ),
    "format not a schema": (
        "/api/generate",
        {"prompt": "hi", "format": {"type": 12}},
        "format.type: not a valid JSON schema",
    ),
    "format neither json nor a schema": (
        "/api/chat",
        {"messages": [USER], "format": "yaml"},
        'format: must be "json" (any JSON object) or a JSON schema object, like {"type": "object", '
        '"properties": {"answer": {"type": "string"}}}',
    ),
    "image not base64": (
        "/api/chat",
        {"messages": [{**USER, "images": ["not base64!"]}]},
        "messages[0].images[0]: not valid base64; send the image's bytes base64-encoded, without a data: prefix",
    ),
    "image not an image": (
        "/api/generate",
        {"prompt": "hi", "images": [b64(PNG), b64(b"GIF? no, plain text")]},
        "images[1]: not a PNG, JPEG, WEBP, GIF image by its bytes",
    ),
    "think level": (
        "/api/chat",
        {"messages": [USER], "think": "max"},
        'think: must be true, false, "low", "medium" or "high" (got "max")',
    ),
    "keep_alive without a unit": (
        "/api/generate",
        {"prompt": "hi", "keep_alive": "5"},
        'keep_alive: must be a number of seconds or a duration like "5m", "1h30m" or "0" (got \'5\')',
    ),
    "tool calls as a string": (
        "/api/chat",
        {
            "messages": [
                USER,
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "ok"},
            ],
            "tools": [TOOL],
        },
        "messages[1].tool_calls[0].function.arguments: must be a JSON object (Ollama's arguments are an object, "
        "not a string of JSON)",
    ),  # fmt: skip
    "tools on generate": (
        "/api/generate",
        {"prompt": "hi", "tools": [TOOL]},
        "tools: /api/generate takes no tools (Ollama would ignore them); send them to /api/chat",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_400_naming_the_field_logged_and_never_sent(gateway: Gateway, fake: FakeOllama, case: str) -> None:
    path, fields, error = BAD_INPUT[case]
    response = httpx.post(f"{gateway.url}{path}", json={"model": "llama3", **fields}, timeout=30)

    assert response.status_code == 400
    assert list(response.json()) == ["error"]
    assert response.json()["error"].startswith(error)
    assert generations(fake) == []
    line = gateway.logged(response.headers["x-request-id"])
    assert (line["status"], line["error"]["code"], line["model"]) == ("error", "invalid_request", "llama3")
    assert line["error"]["message"] == response.json()["error"]


def test_an_image_over_the_limit_is_400_naming_the_setting(tmp_path: Path) -> None:
    with fake_gateway(tmp_path / "log.jsonl", max_image_bytes=32) as gateway:
        assert gateway.fake is not None
        ids = RequestIds()
        with ollama_client(gateway, ids) as client, pytest.raises(ollama.ResponseError) as caught:
            client.chat(model="llama3", messages=[{"role": "user", "content": "see", "images": [PNG]}])

        assert caught.value.status_code == 400
        assert caught.value.error == (
            f"messages[0].images[0]: the image is about {len(PNG)} bytes; the limit is 32 (MINIVAULT_MAX_IMAGE_BYTES)"
        )
        assert generations(gateway.fake) == []
        line = gateway.logged(ids.last)
        assert (line["status"], line["error"]["message"]) == ("error", caught.value.error)


@pytest.mark.parametrize(
    ("model", "asks", "missing"),
    [
        ("plain", {"tools": [get_weather]}, "tools"),
        ("plain", {"think": True}, "thinking"),
        ("thinker", {"messages": [{"role": "user", "content": "see", "images": [PNG]}]}, "vision"),
    ],
    ids=["tools", "thinking", "vision"],
)
def test_a_model_without_the_capability_is_400_in_ollamas_words_before_any_generation(
    gateway: Gateway, fake: FakeOllama, client: ollama.Client, ids: RequestIds, model: str, asks: dict[str, Any],
    missing: str,
) -> None:  # fmt: skip
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=model, **{"messages": [{"role": "user", "content": "hi"}], **asks})

    assert caught.value.status_code == 400
    assert caught.value.error == f'model "{model}" does not support {missing}'
    assert generations(fake) == []  # only /api/show was asked
    assert [path for path, _ in fake.received] == ["/api/show"]
    line = gateway.logged(ids.last)
    assert (line["status"], line["error"]["code"], line["error"]["message"]) == (
        "error", "missing_capability", caught.value.error,
    )  # fmt: skip


def test_a_fill_in_the_middle_request_to_a_model_without_insert_is_400(fake: FakeOllama, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="llama3", prompt="def f(", suffix=")")

    assert (caught.value.status_code, caught.value.error) == (400, 'model "llama3" does not support insert')
    assert generations(fake) == []


def test_plain_text_asks_ollama_for_nothing_but_the_answer(fake: FakeOllama, client: ollama.Client) -> None:
    client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    client.generate(model="llama3", prompt="hi")

    # No /api/show round trip for a request that needs no capability beyond text.
    assert [path for path, _ in fake.received] == ["/api/chat", "/api/generate"]


def test_capabilities_are_asked_once_per_model(fake: FakeOllama, client: ollama.Client) -> None:
    for _ in range(3):
        client.chat(model="llama3", messages=[{"role": "user", "content": "CALL_TOOL"}], tools=[get_weather])

    assert [path for path, _ in fake.received] == ["/api/show", "/api/chat", "/api/chat", "/api/chat"]


# --- the backend's wire, for what the Ollama dialect cannot ask (other dialects' tool_choice and call ids) -----


OLLAMA_URL = "http://ollama.test:11434"
DONE_LINE = {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"}
WEATHER = Tool("get_weather", "The weather", {"type": "object", "properties": {"city": {"type": "string"}}})
CLOCK = Tool("get_time", None, {"type": "object"})


async def sent_payload(chat: ChatInput, lines: list[dict[str, Any]] | None = None) -> tuple[list[Any], Any]:
    """What OllamaBackend sends for `chat` (its /api/show answered: tools and vision), and the events it yields."""
    async with httpx.AsyncClient(base_url=OLLAMA_URL) as client, respx.mock(base_url=OLLAMA_URL) as mock:
        mock.post("/api/show").respond(200, json={"capabilities": ["completion", "tools", "vision"]})
        body = b"".join(orjson.dumps(line) + b"\n" for line in [*(lines or []), DONE_LINE])
        route = mock.post("/api/chat").respond(200, content=body)
        events = [event async for event in OllamaBackend(client, OLLAMA_URL, "m").stream(chat, Completion())]
        return events, orjson.loads(route.calls.last.request.content)


def tool_chat(choice: ToolChoice | None, *messages: Message) -> ChatInput:
    return ChatInput("m", (Message("user", "hi"), *messages), conversation=True, tools=(WEATHER, CLOCK),
                     tool_choice=choice)  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("choice", "offered"),
    [(None, ["get_weather", "get_time"]), (ToolChoice("auto"), ["get_weather", "get_time"]),
     (ToolChoice("required"), ["get_weather", "get_time"]), (ToolChoice("function", "get_time"), ["get_time"]),
     (ToolChoice("none"), None)],
    ids=["unset", "auto", "required", "function", "none"],
)  # fmt: skip
async def test_tool_choice_becomes_the_tools_ollama_is_sent(
    choice: ToolChoice | None, offered: list[str] | None
) -> None:
    _, payload = await sent_payload(tool_chat(choice))

    names = [tool["function"]["name"] for tool in payload["tools"]] if "tools" in payload else None
    assert names == offered
    if names and names[0] == "get_weather":
        weather = {"name": "get_weather", "description": "The weather", "parameters": WEATHER.parameters}
        assert payload["tools"][0] == {"type": "function", "function": weather}
    if offered is not None:
        # Ollama's shape, the schema passed on unchanged (a description only where there is one).
        clock = {"name": "get_time", "parameters": {"type": "object"}}
        assert payload["tools"][-1] == {"type": "function", "function": clock}


@pytest.mark.anyio
async def test_history_goes_to_ollama_in_its_words_with_the_arguments_as_written() -> None:
    # An OpenAI client's turn: spacing in the arguments, a call id, a result naming only the call.
    call = ToolCall("call_9", "get_weather", '{"city":  "Paris", "a": 1}')
    chat = tool_chat(
        None,
        Message("assistant", "", tool_calls=(call,), thinking="Paris, then."),
        Message("tool", "18 C", tool_call_id="call_9"),
        Message("user", "and this?", images=(Image(PNG, "image/png"),)),
    )
    _, payload = await sent_payload(chat)

    assert payload["messages"][1:] == [
        {"role": "assistant", "content": "", "thinking": "Paris, then.",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris", "a": 1}}, "id": "call_9"}]},
        {"role": "tool", "content": "18 C", "tool_name": "get_weather", "tool_call_id": "call_9"},
        {"role": "user", "content": "and this?", "images": [base64.b64encode(PNG).decode()]},
    ]  # fmt: skip


@pytest.mark.anyio
async def test_a_call_whose_arguments_are_no_object_is_refused_before_ollama() -> None:
    chat = tool_chat(None, Message("assistant", "", tool_calls=(ToolCall("c", "get_weather", "[1, 2]"),)))
    with pytest.raises(InvalidRequest) as caught:
        await sent_payload(chat)

    assert caught.value.message.startswith("messages[1].tool_calls[0].function.arguments: Ollama takes a call's")


@pytest.mark.anyio
async def test_ollamas_thinking_and_whole_calls_become_events_numbered_across_the_answer() -> None:
    call = {"id": "call_ab", "function": {"index": 0, "name": "get_weather", "arguments": {"z": 1, "a": 2}}}
    lines = [
        {"message": {"role": "assistant", "content": "", "thinking": "hm"}, "done": False},
        {"message": {"role": "assistant", "content": "ok"}, "done": False},
        {"message": {"role": "assistant", "content": "", "tool_calls": [call]}, "done": False},
        {"message": {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_time"}}]},
         "done": False},
    ]  # fmt: skip
    events, _ = await sent_payload(tool_chat(None), lines)

    assert events == [
        ThinkingDelta("hm"), "ok", ToolCallDelta(0, "call_ab", "get_weather", '{"z":1,"a":2}'),
        ToolCallDelta(1, None, "get_time", "{}"),
    ]  # fmt: skip


# --- rendering: deltas of any backend as Ollama's lines ----------------------------------------------------------


def line_stream(chat: bool = True) -> tuple[LineStream, Exchange]:
    backend = cast(Backend, SimpleNamespace(name="openai", default_model="m"))
    exchange = Exchange(Caller("req-1", "ollama"), backend, prompt="hi", model="m")
    return LineStream(exchange, chat), exchange


def test_fragments_of_a_call_are_one_line_once_the_call_is_complete() -> None:
    lines, exchange = line_stream()
    # As an OpenAI-compatible upstream streams them: id and name first, then pieces of the argument text.
    deltas: list[Event] = [
        "Let me see. ", ToolCallDelta(0, "call_1", "get_weather", ""), ToolCallDelta(0, arguments='{"city": '),
        ToolCallDelta(0, arguments='"Paris"}'), ToolCallDelta(1, "call_2", "get_time", ""), ToolCallDelta(1),
    ]  # fmt: skip
    chunks = [lines.token(delta) for delta in deltas]
    exchange.completion.done_reason = "tool_calls"
    end = lines.end()

    assert chunks[2:4] == [b"", b""]  # nothing until the call is complete
    first = orjson.loads(chunks[4])
    assert first["message"] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}]}  # fmt: skip
    assert b'"arguments":{"city": "Paris"}' in chunks[4]  # the model's text, spacing and all
    *calls, final = [orjson.loads(line) for line in end.splitlines()]
    assert [c["message"]["tool_calls"][0]["function"] for c in calls] == [
        {"index": 1, "name": "get_time", "arguments": {}}
    ]
    assert (final["done"], final["done_reason"]) == (True, "stop")


def test_text_after_a_call_sends_the_call_first_and_thinking_has_its_own_lines() -> None:
    lines, _ = line_stream(chat=False)
    chunks = [lines.token(e) for e in (ThinkingDelta("hm"), "a", ToolCallDelta(0, None, "f", "[1]"), "b", "c")]

    thinking = orjson.loads(chunks[0])
    assert (thinking["response"], thinking["thinking"], thinking["done"]) == ("", "hm", False)
    assert orjson.loads(chunks[1])["response"] == "a"
    call_line, text_line = chunks[3].splitlines()
    # Text that is no JSON object has no place in Ollama's arguments: it goes as a string, unchanged.
    assert orjson.loads(call_line)["tool_calls"] == [{"id": "call_0", "function": {"index": 0, "name": "f",
                                                                                    "arguments": "[1]"}}]  # fmt: skip
    assert orjson.loads(text_line)["response"] == "b"
    assert orjson.loads(chunks[4])["response"] == "c"


def test_a_whole_answer_holds_the_thinking_and_the_calls() -> None:
    lines, exchange = line_stream()
    exchange.absorb(ThinkingDelta("hm"))
    exchange.absorb(ToolCallDelta(0, "call_7", "get_weather", '{"b": 1, "a": 2}'))

    answer = orjson.dumps(lines.whole(exchange))

    assert orjson.loads(answer)["message"] == {"role": "assistant", "content": "", "thinking": "hm", "tool_calls": [
        {"id": "call_7", "function": {"index": 0, "name": "get_weather", "arguments": {"b": 1, "a": 2}}}]}  # fmt: skip
    assert b'"arguments":{"b": 1, "a": 2}' in answer
