"""Tools, structured output, images, thinking and fill-in-the-middle through /v1 with OpenAI's own SDK, over both
upstreams: the fake Ollama (MINIVAULT_BACKEND=ollama) and the fake OpenAI-compatible server (MINIVAULT_BACKEND=openai).

Each test reads what reached the upstream from the fake's own record of the wire, so a field that was dropped or
re-serialised on the way fails it.
"""

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import respx
from pydantic import BaseModel

from app.backends import ChatInput, Completion
from app.backends.base import Upstream
from app.backends.openai_compat import OpenAICompatBackend
from app.errors import BackendError, InvalidRequest
from app.vocabulary import Image, Message, ThinkingDelta, Tool, ToolCallDelta
from tests.support.dialect_servers import Gateway, fake_gateway, ollama_client
from tests.support.fake_ollama import FakeOllama
from tests.support.fake_openai import FakeOpenAI, openai_gateway

# A 1x1 PNG.
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
PIXEL_URL = "data:image/png;base64," + base64.b64encode(PIXEL).decode()
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# Models both fakes serve, each able to do what its name is used for here.
CHAT, VISION, THINKER, CODER = "qwen2.5:0.5b", "llava:7b", "qwen3:8b", "qwen2.5-coder:1.5b"
MODELS = [CHAT, VISION, THINKER, CODER]


@dataclass
class Side:
    """MiniVault over one upstream, and that upstream's record of what it was sent."""

    name: str
    gateway: Gateway
    ollama: FakeOllama | None = None
    upstream: FakeOpenAI | None = None

    @property
    def chat_path(self) -> str:
        return "/api/chat" if self.ollama is not None else "/v1/chat/completions"

    def received(self) -> list[tuple[str, Any]]:
        fake = self.ollama if self.ollama is not None else self.upstream
        assert fake is not None
        return fake.received

    def raw(self) -> list[tuple[str, bytes]]:
        fake = self.ollama if self.ollama is not None else self.upstream
        assert fake is not None
        return fake.raw_requests

    def chats(self) -> list[dict[str, Any]]:
        """The chat requests the upstream received, in order."""
        return [body for path, body in self.received() if path == self.chat_path]

    def script_call(self, name: str, arguments: str, call_id: str) -> str:
        """Have the upstream's next answers call `name`; the arguments' text as MiniVault will relay it."""
        if self.ollama is not None:
            # Ollama sends arguments as an object: MiniVault writes it as compact JSON.
            self.ollama.tool_calls = [{"name": name, "arguments": json.loads(arguments), "id": call_id}]
            return orjson.dumps(json.loads(arguments)).decode()
        assert self.upstream is not None
        self.upstream.tool_calls = [{"name": name, "arguments": arguments, "id": call_id}]
        return arguments


@pytest.fixture(scope="module")
def ollama_side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    with fake_gateway(tmp_path_factory.mktemp("ollama") / "log.jsonl") as gateway:
        fake = gateway.fake
        assert fake is not None
        fake.add_model(CHAT, ["completion", "tools"])
        fake.add_model(VISION, ["completion", "vision"])
        fake.add_model(THINKER, ["completion", "tools", "thinking"])
        fake.add_model(CODER, ["completion", "insert"])
        yield Side("ollama", gateway, ollama=fake)


@pytest.fixture(scope="module")
def openai_side(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    upstream = FakeOpenAI(MODELS)
    with openai_gateway(tmp_path_factory.mktemp("openai") / "log.jsonl", upstream) as gateway:
        yield Side("openai", gateway, upstream=upstream)


@pytest.fixture(params=["ollama", "openai"])
def side(request: pytest.FixtureRequest) -> Iterator[Side]:
    chosen: Side = request.getfixturevalue(f"{request.param}_side")
    yield chosen
    # Scripts are per test.
    if chosen.ollama is not None:
        chosen.ollama.tool_calls = None
    if chosen.upstream is not None:
        chosen.upstream.tool_calls = None


@pytest.fixture
def client(side: Side) -> Iterator[openai.OpenAI]:
    with side.gateway.openai_client() as sdk:
        yield sdk


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_a_tool_call_comes_back_whole(side: Side, client: openai.OpenAI) -> None:
    arguments = side.script_call("get_weather", '{"city": "Paris"}', "call_1")

    completion = client.chat.completions.create(
        model=CHAT, messages=ask("What is the weather in Paris?"), tools=[WEATHER], parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip

    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.model_dump() == {
        "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments},
    }  # fmt: skip
    sent = side.chats()[-1]
    assert sent["tools"] == [WEATHER]
    assert sent["messages"] == [{"role": "user", "content": "What is the weather in Paris?"}]
    if side.ollama is not None:
        # Ollama has neither field: the named tool is the only one sent (here the only one offered anyway).
        assert {"tool_choice", "parallel_tool_calls"} & set(sent) == set()
    else:
        assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
        assert sent["parallel_tool_calls"] is False
    line = side.gateway.logged(completion.id.removeprefix("chatcmpl-"))
    assert (line["status"], line["endpoint"]) == ("ok", "openai")


def test_a_streamed_tool_call_accumulates_with_the_sdks_helper(side: Side, client: openai.OpenAI) -> None:
    arguments = side.script_call("get_weather", '{"city": "Paris", "unit": "celsius"}', "call_7")

    with client.chat.completions.stream(model=CHAT, messages=ask("Weather?"), tools=[WEATHER]) as stream:
        fragments = [event.arguments_delta for event in stream if event.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()

    [choice] = final.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert (call.id, call.type, call.function.name, call.function.arguments) == (
        "call_7", "function", "get_weather", arguments,
    )  # fmt: skip
    assert "".join(fragments) == arguments
    # Ollama sends a call whole; an OpenAI-compatible server its name with no arguments, then the arguments in
    # pieces (4 characters here): relayed as they came.
    pieces = [arguments[i : i + 4] for i in range(0, len(arguments), 4)]
    expected = [arguments] if side.ollama is not None else ["", *pieces]
    assert fragments == expected


def test_the_stream_frames_of_a_tool_call(openai_side: Side) -> None:
    """The chunks themselves: the call's id, type and name first, then argument fragments only, then the reason."""
    arguments = openai_side.script_call("get_weather", '{"city":"Oslo"}', "call_9")
    body = {"model": CHAT, "messages": ask("Weather?"), "tools": [WEATHER], "stream": True}
    with httpx.stream("POST", f"{openai_side.gateway.url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]

    assert response.status_code == 200
    assert lines[-1] == "data: [DONE]"
    frames = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    deltas = [frame["choices"][0]["delta"] for frame in frames]
    assert deltas[0] == {
        "role": "assistant",
        "tool_calls": [{"index": 0, "id": "call_9", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}],
    }  # fmt: skip
    assert deltas[1:-1] == [
        {"tool_calls": [{"index": 0, "function": {"arguments": arguments[i : i + 4]}}]}
        for i in range(0, len(arguments), 4)
    ]
    assert deltas[-1] == {}
    assert [frame["choices"][0]["finish_reason"] for frame in frames] == [None] * (len(frames) - 1) + ["tool_calls"]
    assert {frame["object"] for frame in frames} == {"chat.completion.chunk"}


class Colour(BaseModel):
    name: str
    hex: str


def test_parse_returns_the_pydantic_model(side: Side, client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(model=CHAT, messages=ask("Name a colour"), response_format=Colour)

    [choice] = completion.choices
    # The fakes answer with an instance of the schema whose strings are the prompt.
    assert choice.message.parsed == Colour(name="Name a colour", hex="Name a colour")
    assert choice.finish_reason == "stop"
    sent = side.chats()[-1]
    schema = {
        "type": "object", "title": "Colour", "additionalProperties": False, "required": ["name", "hex"],
        "properties": {"name": {"title": "Name", "type": "string"}, "hex": {"title": "Hex", "type": "string"}},
    }  # fmt: skip
    if side.ollama is not None:
        assert sent["format"] == schema
    else:
        assert sent["response_format"] == {
            "type": "json_schema", "json_schema": {"name": "Colour", "schema": schema, "strict": True},
        }  # fmt: skip


def test_json_object_asks_for_any_json(side: Side, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=CHAT, messages=ask("Say hi"), response_format={"type": "json_object"}
    )

    assert json.loads(completion.choices[0].message.content or "") == {"answer": "Say hi"}
    sent = side.chats()[-1]
    if side.ollama is not None:
        assert sent["format"] == "json"
    else:
        assert sent["response_format"] == {"type": "json_object"}


def test_an_image_part_reaches_the_upstream_with_its_bytes(side: Side, client: openai.OpenAI) -> None:
    content: Any = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": PIXEL_URL}}]

    completion = client.chat.completions.create(model=VISION, messages=[{"role": "user", "content": content}])

    assert completion.choices[0].message.content == f"I see 1 image(s): {len(PIXEL)} bytes. What is this?"
    [message] = side.chats()[-1]["messages"]
    if side.ollama is not None:
        assert message == {"role": "user", "content": "What is this?", "images": [base64.b64encode(PIXEL).decode()]}
    else:
        assert message == {"role": "user", "content": content}


def test_an_http_image_url_is_refused_naming_the_field(side: Side, client: openai.OpenAI) -> None:
    before = len(side.received())
    content: Any = [{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]  # fmt: skip

    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(model=VISION, messages=[{"role": "user", "content": content}])

    body = caught.value.body
    assert isinstance(body, dict)
    assert (body["type"], body["code"], body["param"]) == (
        "invalid_request_error", "invalid_request", "messages[0].content[1].image_url.url",
    )  # fmt: skip
    assert body["message"] == (
        "messages[0].content[1].image_url.url: MiniVault does not fetch URLs on a client's behalf; send the image "
        "inline as a data: URL (data:image/png;base64,...)"
    )
    assert len(side.received()) == before
    assert caught.value.request_id is not None
    line = side.gateway.logged(caught.value.request_id)
    assert (line["status"], line["error"]["code"], line["error"]["message"]) == (
        "error", "invalid_request", body["message"],
    )  # fmt: skip


def test_reasoning_effort_gives_reasoning_content(side: Side, client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=THINKER, messages=ask("Is 91 prime?"), reasoning_effort="low")
    with client.chat.completions.stream(model=THINKER, messages=ask("Is 91 prime?"), reasoning_effort="low") as s:
        streamed = s.get_final_completion()

    for completion in (whole, streamed):
        message = completion.choices[0].message
        assert message.content == "Is 91 prime?"
        assert (message.model_extra or {})["reasoning_content"] == "Thinking (low) about: Is 91 prime?"
        assert completion.choices[0].finish_reason == "stop"
    for sent in side.chats()[-2:]:
        if side.ollama is not None:
            assert sent["think"] == "low"
        else:
            assert sent["reasoning_effort"] == "low"


def test_vllms_reasoning_field_is_thinking_too(openai_side: Side) -> None:
    assert openai_side.upstream is not None
    openai_side.upstream.reasoning_field = "reasoning"  # vLLM's newer servers
    try:
        with openai_side.gateway.openai_client() as client:
            completion = client.chat.completions.create(model=THINKER, messages=ask("Why?"), reasoning_effort="high")
    finally:
        openai_side.upstream.reasoning_field = "reasoning_content"

    assert (completion.choices[0].message.model_extra or {})["reasoning_content"] == "Thinking (high) about: Why?"
    assert openai_side.chats()[-1]["reasoning_effort"] == "high"


def test_reasoning_effort_none_turns_thinking_off(side: Side, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=THINKER, messages=ask("Is 7 prime?"), reasoning_effort="none")

    message = completion.choices[0].message
    assert message.content == "Is 7 prime?"
    assert "reasoning_content" not in (message.model_extra or {})
    sent = side.chats()[-1]
    if side.ollama is not None:
        assert sent["think"] is False
    else:
        assert "reasoning_effort" not in sent


def test_extra_sampling_fields_reach_the_upstream(side: Side, client: openai.OpenAI) -> None:
    client.chat.completions.create(
        model=CHAT, messages=ask("hi"), seed=7, extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1}
    )

    sent = side.chats()[-1]
    if side.ollama is not None:
        assert sent["options"] == {"top_k": 20, "min_p": 0.05, "repeat_penalty": 1.1, "seed": 7}
    else:
        picked = {key: sent.get(key) for key in ("top_k", "min_p", "repeat_penalty", "repetition_penalty", "seed")}
        assert picked == {"top_k": 20, "min_p": 0.05, "repeat_penalty": 1.1, "repetition_penalty": 1.1, "seed": 7}


def test_load_time_options_are_named_not_refused(openai_side: Side) -> None:
    # aider's ollama_chat/ path sends options.num_ctx on every request; a server like llama.cpp sets it at load.
    body = {"model": CHAT, "messages": ask("hi"), "stream": False,
            "options": {"num_ctx": 8192, "num_gpu": 1, "temperature": 0.5}}  # fmt: skip

    response = httpx.post(f"{openai_side.gateway.url}/api/chat", json=body, timeout=30)

    assert response.status_code == 200
    assert response.headers["x-minivault-ignored-options"] == "num_ctx, num_gpu"
    assert response.json()["message"]["content"] == "hi"
    sent = openai_side.chats()[-1]
    assert sent["temperature"] == 0.5
    assert {"num_ctx", "num_gpu", "options"} & set(sent) == set()


def test_a_two_turn_agent_loop_sends_the_arguments_back_byte_for_byte(side: Side, client: openai.OpenAI) -> None:
    # Spacing a re-serialiser would change: the text must come back exactly as the model wrote it.
    arguments = side.script_call("get_weather", '{"city":  "Paris" , "unit": "C"}', "call_42")
    history: list[Any] = ask("Weather in Paris?")

    first = client.chat.completions.create(model=CHAT, messages=history, tools=[WEATHER])
    [call] = first.choices[0].message.tool_calls or []
    history.append(first.choices[0].message.model_dump(exclude_none=True))
    history.append({"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"})
    second = client.chat.completions.create(model=CHAT, messages=history, tools=[WEATHER])

    assert call.type == "function" and call.function.arguments == arguments
    assert second.choices[0].finish_reason == "stop"
    turn = side.chats()[-1]["messages"]
    assert [m["role"] for m in turn] == ["user", "assistant", "tool"]
    if side.ollama is not None:
        assert second.choices[0].message.content == "get_weather said: 18 C and sunny"
        assert turn[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": json.loads(arguments)}
        assert turn[2] == {
            "role": "tool", "content": "18 C and sunny", "tool_name": "get_weather", "tool_call_id": "call_42",
        }  # fmt: skip
    else:
        assert second.choices[0].message.content == "call_42 said: 18 C and sunny"
        assert turn[1] == {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_42", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        }
        assert turn[2] == {"role": "tool", "content": "18 C and sunny", "tool_call_id": "call_42"}
    # Byte for byte on the wire itself, whatever the upstream's JSON around it.
    raw = [body for path, body in side.raw() if path == side.chat_path][-1]
    # Ollama takes the arguments as an object (the text itself, embedded), OpenAI as a string holding the text.
    embedded = arguments if side.ollama is not None else json.dumps(arguments)
    assert raw.count(f'"arguments":{embedded}'.encode()) == 1


TOOL: Any = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("asks", "param", "message"),
    [
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools[0].function.name",
         "tools[0].function.name: must be 1 to 64 letters, digits, underscores or hyphens (got 'get weather')"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
         'tool_choice.function.name: "get_time" is not one of the tools offered (get_weather); name one of them, '
         "or add it to `tools`"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
         "response_format.json_schema.schema", "response_format.json_schema.schema.type: not a valid JSON schema "
         "(5 is not valid under any of the schemas listed in the 'anyOf' keyword)"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "object"}}]},
         "tools[0].function.parameters", 'tools[0].function.parameters: must be a JSON schema object, like '
         '{"type": "object", "properties": {}}'),
        ({"tool_choice": "required"}, "tool_choice", 'tool_choice: "required" asks for a tool call, and `tools` '
         "offers none"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "input_audio"}]}]},
         "messages[0].content[1].type", 'messages[0].content[1].type: "input_audio" parts are not supported in a '
         'user message; send "text" or "image_url" parts'),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content",
         "messages[0].content: must be a string or an array of content parts (got 5)"),
        ({"messages": [{"role": "tool", "content": "18 C"}]}, "messages[0].tool_call_id",
         "messages[0].tool_call_id: is required: the id of the tool call this result answers"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": {"a": 1}}}]}]}, "messages[0].tool_calls[0].function.arguments",
         "messages[0].tool_calls[0].function.arguments: must be a string: the JSON text the model produced, sent "
         "back as it came"),
        ({"functions": [{"name": "f"}]}, "functions",
         "`functions` is OpenAI's deprecated function calling; send the functions as `tools`"),
        ({"logprobs": True}, "logprobs", "log probabilities are not supported; remove `logprobs`"),
        ({"n": 2}, "n", "n: must be 1: MiniVault returns one answer per request (send n requests instead)"),
    ],
    ids=["tool-name", "tool-choice", "schema", "parameters", "required-without-tools", "part-type", "content",
         "tool-call-id", "arguments-object", "functions", "logprobs", "n"],
)  # fmt: skip
def test_bad_input_is_refused_naming_the_field(side: Side, asks: dict[str, Any], param: str, message: str) -> None:
    before = len(side.received())
    body = {"model": CHAT, "messages": ask("hi"), **asks}

    response = httpx.post(f"{side.gateway.url}/v1/chat/completions", json=body, timeout=30)

    assert response.status_code == 422
    assert response.json() == {
        "error": {"message": message, "type": "invalid_request_error", "code": "invalid_request", "param": param}
    }
    assert len(side.received()) == before
    line = side.gateway.logged(response.headers["x-request-id"])
    assert (line["status"], line["error"]["code"], line["error"]["message"]) == ("error", "invalid_request", message)


def test_fill_in_the_middle_through_completions(side: Side, client: openai.OpenAI) -> None:
    prompt, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))"

    completion = client.completions.create(model=CODER, prompt=prompt, suffix=suffix, max_tokens=16)

    assert completion.choices[0].text == f"<fim prefix={len(prompt)} suffix={len(suffix)}>"
    assert completion.choices[0].finish_reason == "stop"
    if side.ollama is not None:
        sent = side.ollama.last_request["/api/generate"]
        assert (sent["prompt"], sent["suffix"], sent["options"]) == (prompt, suffix, {"num_predict": 16})
    else:
        assert side.upstream is not None
        sent = side.upstream.last_request["/infill"]
        assert sent == {"model": CODER, "input_prefix": prompt, "input_suffix": suffix, "stream": True,
                        "n_predict": 16}  # fmt: skip


@pytest.mark.parametrize(
    ("fim", "paths", "status"),
    [({"infill"}, ["/infill"], 200), ({"suffix"}, ["/infill", "/v1/completions"], 200),
     ({"infill-unsupported"}, ["/infill"], 400), (set(), ["/infill", "/v1/completions"], 422)],  # its own 400
    ids=["infill", "suffix", "model-without-fim", "server-without-fim"],
)  # fmt: skip
def test_the_openai_backend_finds_the_servers_fill_in_the_middle(
    tmp_path: Path, fim: set[str], paths: list[str], status: int
) -> None:
    upstream = FakeOpenAI(MODELS)
    upstream.fim = fim
    with openai_gateway(tmp_path / "log.jsonl", upstream) as gateway:
        body = {"model": CODER, "prompt": "a = ", "suffix": "\nprint(a)"}
        first = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)
        again = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)

    assert [first.status_code, again.status_code] == [status, status]
    answer = first.json()
    if status == 200:
        assert answer["choices"][0]["text"] == "<fim prefix=4 suffix=9>"
        # The endpoint that answered is remembered: the second request goes straight to it.
        assert [path for path, _ in upstream.received] == [*paths, paths[-1]]
        return
    error = answer["error"]
    # The model's lack (no FIM tokens) is a missing capability; the server's own refusal passes on as a bad request.
    assert (error["code"], error["param"]) == ("missing_capability" if fim else "invalid_request", None)
    if fim:
        assert error["message"].startswith(
            f"the OpenAI-compatible server at {upstream_url(gateway)} has no fill-in-the-middle for model "
            f"'{CODER}' (/infill answered 501: Infill is not supported by this model:"
        )
    else:
        assert error["message"] == "the OpenAI-compatible server rejected the request: Unsupported param: suffix"
    assert [path for path, _ in upstream.received] == paths * 2


def upstream_url(gateway: Gateway) -> str:
    return str(gateway.app.state.backend.url)


def test_a_servers_own_refusal_passes_through(openai_side: Side) -> None:
    assert openai_side.upstream is not None
    openai_side.upstream.refusals[VISION] = "this model does not support tools"
    try:
        body = {"model": VISION, "messages": ask("hi"), "tools": [WEATHER]}
        response = httpx.post(f"{openai_side.gateway.url}/v1/chat/completions", json=body, timeout=30)
    finally:
        del openai_side.upstream.refusals[VISION]

    assert response.status_code == 422
    assert response.json()["error"]["message"] == (
        "the OpenAI-compatible server rejected the request: this model does not support tools"
    )
    assert openai_side.chats()[-1]["tools"] == [WEATHER]


# --- Ollama's dialect over the OpenAI-compatible backend: the same vocabulary, the other way round ----------------


def get_weather(city: str) -> str:
    """The weather in a city now.

    Args:
      city: The city's name.
    """
    return f"18 C in {city}"


def test_an_ollama_agent_loop_over_the_openai_backend(openai_side: Side) -> None:
    assert openai_side.upstream is not None
    openai_side.script_call("get_weather", '{"city": "Oslo"}', "call_5")
    history: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]

    with ollama_client(openai_side.gateway) as client:
        first = client.chat(model=THINKER, messages=history, tools=[get_weather], think=True)
        openai_side.upstream.tool_calls = None
        history += [first.message, {"role": "tool", "tool_name": "get_weather", "content": "sunny"}]
        second = client.chat(model=THINKER, messages=history, tools=[get_weather])

    [call] = first.message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("get_weather", {"city": "Oslo"})
    assert first.message.thinking == "Thinking (medium) about: Weather in Oslo?"
    asked, answered = openai_side.chats()[-2:]
    assert asked["reasoning_effort"] == "medium"
    assert [tool["function"]["name"] for tool in asked["tools"]] == ["get_weather"]
    # The ollama client drops the call's id: the call gets one from its place, and the result answers it.
    assert answered["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1_0", "type": "function",
                                                               "function": {"name": "get_weather",
                                                                            "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1_0"},
    ]  # fmt: skip
    assert second.message.content == "call_1_0 said: sunny"


def test_ollama_images_format_and_raw_over_the_openai_backend(openai_side: Side) -> None:
    assert openai_side.upstream is not None
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}

    with ollama_client(openai_side.gateway) as client:
        seen = client.chat(model=VISION, messages=[{"role": "user", "content": "What?", "images": [PIXEL]}])
        shaped = client.chat(model=CHAT, messages=[{"role": "user", "content": "Name one"}], format=schema)
        raw = client.generate(model=CHAT, prompt="<|im_start|>user hi", raw=True)

    assert seen.message.content == f"I see 1 image(s): {len(PIXEL)} bytes. What?"
    vision, structured = openai_side.chats()[-2:]
    assert vision["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": PIXEL_URL}}]}]  # fmt: skip
    assert json.loads(shaped.message.content or "") == {"colour": "Name one"}
    assert structured["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    # A raw prompt skips the chat template: /v1/completions, as it came.
    assert raw.response == "<|im_start|>user hi"
    assert openai_side.upstream.last_request["/v1/completions"] == {
        "model": CHAT, "prompt": "<|im_start|>user hi", "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip


# --- the OpenAI-compatible backend's own reading of the wire (respx standing in for the server) --------------------

URL = "http://llm.test:8080"


async def backend_events(
    chat: ChatInput, respond: Callable[[respx.MockRouter], object]
) -> tuple[list[Any], Completion]:
    completion = Completion()
    async with httpx.AsyncClient(base_url=URL) as http:
        backend = OpenAICompatBackend(http, URL, CHAT, upstream=Upstream("the server", URL, "start it"))
        with respx.mock(base_url=URL) as mock:
            respond(mock)
            return [event async for event in backend.stream(chat, completion)], completion


@pytest.mark.anyio
async def test_one_delta_holding_thinking_text_and_a_call_yields_each_in_order() -> None:
    frames = [
        {"choices": [{"index": 0, "delta": {"reasoning_content": "hm", "content": "ok", "tool_calls": [
            {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]  # fmt: skip
    body = b"".join(b"data: " + orjson.dumps(frame) + b"\n\n" for frame in frames) + b"data: [DONE]\n\n"

    events, completion = await backend_events(
        ChatInput(CHAT, (Message("user", "hi"),), tools=(Tool("f"),)),
        lambda mock: mock.post("/v1/chat/completions").respond(200, content=body),
    )

    assert events == [
        ThinkingDelta("hm"),
        "ok",
        ToolCallDelta(0, "c1", "f", '{"a"'),
        ToolCallDelta(0, None, None, ": 1}"),
    ]
    # The dialects tell a tool call by the calls made; the reason itself stays in Ollama's words.
    assert completion.done_reason == "stop"


@pytest.mark.anyio
async def test_an_infill_stream_cut_short_is_an_error() -> None:
    body = b'data: {"content": "x = ", "stop": false}\n\n'

    with pytest.raises(BackendError) as caught:
        await backend_events(
            ChatInput.single(CODER, "a", suffix="b"),
            lambda mock: mock.post("/infill").respond(200, content=body),
        )

    assert caught.value.message == "the server closed the stream before it finished; the answer is incomplete"


@pytest.mark.anyio
async def test_images_cannot_go_with_a_suffix() -> None:
    chat = ChatInput.single(CODER, "a", suffix="b", images=(Image(PIXEL, "image/png"),))

    with pytest.raises(InvalidRequest) as caught:
        await backend_events(chat, lambda mock: None)

    assert caught.value.message == (
        "images cannot go with suffix to the server: a prompt sent as it is has no place for them; send them in a chat"
    )
