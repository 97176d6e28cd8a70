"""The fake Ollama speaks the rest of Ollama's wire format (tools, thinking, structured output, images, fill in the
middle, embeddings, keep_alive, ps/show), checked through Ollama's own Python client wherever it can say it."""

import base64
import math
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import httpx
import ollama
import orjson
import pytest
from pydantic import BaseModel, Field

from tests.support.fake_ollama import FakeOllama
from tests.support.fake_ollama_wire import embedding, go_duration_seconds, schema_instance
from tests.support.servers import RunningServer

THINKER, SEER, CODER, EMBEDDER = "qwen3:latest", "llava:latest", "coder:latest", "minilm:latest"
# A 1x1 PNG, 68 bytes once decoded.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII=")
DONE_FIELDS = {
    "model", "created_at", "message", "done", "done_reason", "total_duration", "load_duration",
    "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration",
}  # fmt: skip


def get_weather(city: str) -> str:
    """Get the weather in a city.

    Args:
      city: The city to get the weather for
    """
    return f"sunny in {city}"


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
      a: The first number
      b: The second number
    """
    return a + b


@pytest.fixture
def wired(fake: FakeOllama) -> FakeOllama:
    """The fake with one model of each kind besides its own (which keep the default capabilities)."""
    fake.add_model(THINKER, ["completion", "tools", "thinking"])
    fake.add_model(SEER, ["completion", "vision"])
    fake.add_model(CODER, ["completion", "insert"])
    fake.add_model(EMBEDDER, ["embedding"])
    return fake


@pytest.fixture
def client(wired: FakeOllama, fake_server: RunningServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=fake_server.url, timeout=10) as client:
        yield client


@pytest.fixture
def http(wired: FakeOllama, fake_server: RunningServer) -> Iterator[httpx.Client]:
    """For what the client cannot show: raw lines, ids, and bodies it would refuse to send."""
    with httpx.Client(base_url=fake_server.url, timeout=10) as http:
        yield http


def lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"] == "application/x-ndjson"
    return [orjson.loads(line) for line in response.text.splitlines()]


def refusal(call: Any) -> tuple[int, str]:
    with pytest.raises(ollama.ResponseError) as caught:
        call()
    return caught.value.status_code, caught.value.error


# --- tools ---------------------------------------------------------------------------------------------------


def test_a_scripted_tool_call_answers_a_chat_with_tools(wired: FakeOllama, client: ollama.Client) -> None:
    wired.tool_calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}]

    answer = client.chat(model="llama3", messages=[{"role": "user", "content": "weather?"}], tools=[get_weather])

    assert (answer.message.content, answer.done_reason) == ("", "stop")
    assert answer.message.tool_calls is not None
    assert [(c.function.name, c.function.arguments) for c in answer.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    # What the client sent is kept as it came: the tool's schema, built from the function's signature.
    sent = wired.last_request["/api/chat"]
    assert sent["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city.",
         "parameters": {"type": "object", "required": ["city"],
                        "properties": {"city": {"type": "string", "description": "The city to get the weather for"}}}}}
    ]  # fmt: skip


def test_the_marker_calls_the_named_tool_with_arguments_from_its_schema(client: ollama.Client) -> None:
    first = client.chat(model="llama3", messages=[{"role": "user", "content": "CALL_TOOL"}], tools=[get_weather, add])
    named = client.chat(
        model="llama3", messages=[{"role": "user", "content": "CALL_TOOL:add"}], tools=[get_weather, add]
    )
    plain = client.chat(model="llama3", messages=[{"role": "user", "content": "no call"}], tools=[get_weather, add])

    assert first.message.tool_calls is not None and named.message.tool_calls is not None
    assert [(c.function.name, c.function.arguments) for c in first.message.tool_calls] == [
        ("get_weather", {"city": "city"})  # a string argument is its own name
    ]
    assert [(c.function.name, c.function.arguments) for c in named.message.tool_calls] == [("add", {"a": 0, "b": 0})]
    assert (plain.message.tool_calls, plain.message.content) == (None, "no call")


def test_streamed_tool_calls_come_whole_in_one_chunk_with_ids_and_indexes(
    wired: FakeOllama, http: httpx.Client
) -> None:
    wired.tool_calls = [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Oslo"}, "id": "call_mine0001"},
    ]
    body = {"model": "llama3", "messages": [{"role": "user", "content": "two cities"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]}  # fmt: skip

    streamed = lines(http.post("/api/chat", json=body))
    whole = http.post("/api/chat", json={**body, "stream": False})

    assert len(streamed) == 2
    call, done = streamed
    calls = call["message"]["tool_calls"]
    assert re.fullmatch(r"call_[a-z0-9]{8}", calls[0]["id"])
    assert calls == [
        {"id": calls[0]["id"], "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}},
        {"id": "call_mine0001", "function": {"index": 1, "name": "get_weather", "arguments": {"city": "Oslo"}}},
    ]
    assert (call["message"]["role"], call["message"]["content"], call["done"]) == ("assistant", "", False)
    assert (done["done"], done["done_reason"], done["message"]) == (True, "stop", {"role": "assistant", "content": ""})
    assert set(done) == DONE_FIELDS
    # The same calls, the same ids: nothing is random.
    assert whole.headers["content-type"] == "application/json; charset=utf-8"
    assert whole.json()["message"] == {"role": "assistant", "content": "", "tool_calls": calls}


def test_a_tool_result_is_answered_in_text_and_recorded_as_it_came(wired: FakeOllama, http: httpx.Client) -> None:
    wired.tool_calls = [{"name": "get_weather", "arguments": {"city": "Paris"}}]  # not repeated after the result
    # Spacing and key order a re-encoder would change: the raw bytes keep them.
    body = (
        b'{"model": "llama3", "stream": false, "tools": [{"type": "function", "function": {"name": "get_weather"}}],'
        b' "messages": [{"role": "user", "content": "weather?"},'
        b' {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",'
        b' "arguments": {"unit":"C",  "city": "Paris"}}}]},'
        b' {"role": "tool", "content": "11 degrees", "tool_name": "get_weather"}]}'
    )

    answer = http.post("/api/chat", content=body, headers={"Content-Type": "application/json"})

    assert answer.json()["message"] == {"role": "assistant", "content": "get_weather said: 11 degrees"}
    assert wired.raw_requests[-1] == ("/api/chat", body)
    assert b'"arguments": {"unit":"C",  "city": "Paris"}' in wired.raw_requests[-1][1]
    path, parsed = wired.received[-1]
    assert path == "/api/chat"
    assert parsed["messages"][2] == {"role": "tool", "content": "11 degrees", "tool_name": "get_weather"}
    assert list(parsed["messages"][1]["tool_calls"][0]["function"]["arguments"]) == ["unit", "city"]


def test_tools_on_a_model_without_tools_get_ollamas_400(wired: FakeOllama, client: ollama.Client) -> None:
    wired.capabilities["tinyllama:1.1b-chat"] = ["completion"]
    messages = [{"role": "user", "content": "CALL_TOOL"}]

    refused = refusal(lambda: client.chat(model="tinyllama:1.1b-chat", messages=messages, tools=[get_weather]))
    plain = client.chat(model="tinyllama:1.1b-chat", messages=messages)

    assert refused == (400, "registry.ollama.ai/library/tinyllama:1.1b-chat does not support tools")
    assert plain.message.content == "CALL_TOOL"


# --- thinking ------------------------------------------------------------------------------------------------


def test_think_streams_thinking_before_the_content(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "why is the sky blue"}]

    whole = client.chat(model=THINKER, messages=messages, think=True)
    parts = list(client.chat(model=THINKER, messages=messages, think="high", stream=True))

    assert (whole.message.thinking, whole.message.content) == (
        "Thinking (medium) about: why is the sky blue", "why is the sky blue"
    )  # fmt: skip
    kinds = ["thinking" if p.message.thinking else "content" for p in parts if not p.done]
    assert kinds == ["thinking"] * 8 + ["content"] * 5
    assert "".join(p.message.thinking or "" for p in parts) == "Thinking (high) about: why is the sky blue"
    assert "".join(p.message.content or "" for p in parts) == "why is the sky blue"
    assert parts[-1].done is True
    assert parts[-1].eval_count == 13


def test_generate_thinks_at_the_level_asked_and_a_scripted_thought(wired: FakeOllama, client: ollama.Client) -> None:
    low = client.generate(model=THINKER, prompt="two words", think="low")
    wired.thinking = "Hmm, let me see."
    scripted = list(client.generate(model=THINKER, prompt="two words", think=True, stream=True))

    assert (low.thinking, low.response) == ("Thinking (low) about: two words", "two words")
    assert [p.thinking for p in scripted[:4]] == ["Hmm, ", "let ", "me ", "see."]
    assert [p.response for p in scripted[:4]] == ["", "", "", ""]
    assert "".join(p.response or "" for p in scripted) == "two words"


def test_a_thinking_model_thinks_unless_told_not_to(client: ollama.Client) -> None:
    default = client.generate(model=THINKER, prompt="hello")
    off = client.generate(model=THINKER, prompt="hello", think=False)

    assert default.thinking == "Thinking (medium) about: hello"
    assert (off.thinking, off.response) == (None, "hello")


def test_think_on_a_model_without_thinking_gets_ollamas_400(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "hi"}]

    chat = refusal(lambda: client.chat(model="llama3", messages=messages, think=True))
    generate = refusal(lambda: client.generate(model="tinyllama:1.1b-chat", prompt="hi", think="medium"))
    unthinking = client.chat(model="llama3", messages=messages, think=False)

    assert chat == (400, '"llama3" does not support thinking')  # the name as asked, quoted as Go's %q
    assert generate == (400, '"tinyllama:1.1b-chat" does not support thinking')
    assert (unthinking.message.thinking, unthinking.message.content) == (None, "hi")


def test_a_think_value_ollama_cannot_read_is_its_400(http: httpx.Client) -> None:
    levels = '"high", "medium", "low", "max", true, or false'
    odd = http.post("/api/generate", json={"model": THINKER, "prompt": "hi", "think": "extreme"})
    number = http.post("/api/generate", json={"model": THINKER, "prompt": "hi", "think": 1})

    assert (odd.status_code, odd.json()) == (400, {"error": f'invalid think value: "extreme" (must be {levels})'})
    assert (number.status_code, number.json()) == (400, {"error": f"think must be a boolean or string ({levels})"})


# --- structured output ---------------------------------------------------------------------------------------


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    number: int = Field(ge=1)


class Person(BaseModel):
    name: str = Field(min_length=3, max_length=20)
    age: int = Field(gt=17, le=130)
    score: float = Field(ge=0.5, multiple_of=0.25)
    likes: list[Colour] = Field(min_length=2)
    home: Address
    previous: list[Address] = []
    nickname: str | None = None
    friend: "Person | None" = None
    active: bool


def test_format_json_answers_a_json_object_in_several_chunks(client: ollama.Client) -> None:
    parts = list(client.generate(model="llama3", prompt="the sky is blue", format="json", stream=True))

    text = "".join(p.response or "" for p in parts)
    assert orjson.loads(text) == {"answer": "the sky is blue"}
    assert [p.response for p in parts if not p.done] == ['{"answer": ', '"the ', "sky ", "is ", 'blue"}']


def test_a_json_schema_format_answers_an_instance_of_it(client: ollama.Client) -> None:
    schema = Person.model_json_schema()
    assert "$defs" in schema  # nested models, the enum and the recursion all go through $ref

    whole = client.chat(model="llama3", messages=[{"role": "user", "content": "Ann Lee"}], format=schema)
    parts = list(client.chat(model="llama3", messages=[{"role": "user", "content": "Ann Lee"}], format=schema,
                             stream=True))  # fmt: skip

    person = Person.model_validate_json(whole.message.content or "")
    assert (person.name, person.age, person.score, person.likes, person.active) == (
        "Ann Lee", 18, 0.5, [Colour.RED, Colour.RED], True
    )  # fmt: skip
    assert (person.home, person.previous) == (
        Address(street="Ann Lee", number=1),
        [Address(street="Ann Lee", number=1)],
    )
    assert person.friend is not None and person.friend.home.number == 1  # recursion is followed, then ends
    assert len([p for p in parts if p.message.content]) > 10
    assert "".join(p.message.content or "" for p in parts) == whole.message.content


def test_schema_instances_respect_bounds_and_shapes() -> None:
    assert schema_instance({"type": "integer", "exclusiveMinimum": 5, "maximum": 9}, "t") == 6
    assert schema_instance({"type": "integer", "minimum": 7, "multipleOf": 5}, "t") == 10
    assert schema_instance({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.2}, "t") == 0.1
    assert schema_instance({"type": "number", "maximum": -3}, "t") == -3.0
    assert schema_instance({"type": "string", "minLength": 4}, "ab") == "abxx"
    assert schema_instance({"type": "string", "maxLength": 2}, "abc") == "ab"
    assert schema_instance({"type": "string", "format": "date-time"}, "t") == "2026-01-01T00:00:00Z"
    assert schema_instance({"type": ["null", "boolean"]}, "t") is True
    assert schema_instance({"type": "array", "prefixItems": [{"type": "integer"}, {"const": "x"}]}, "t") == [0, "x"]
    assert schema_instance({"type": "array", "items": {"type": "string"}, "minItems": 3, "uniqueItems": True}, "t") == [
        "t0", "t1", "t2"
    ]  # fmt: skip
    assert schema_instance({"type": "object", "required": ["a"]}, None) == {"a": "a"}


# --- images --------------------------------------------------------------------------------------------------


def test_images_reach_a_vision_model_intact(wired: FakeOllama, client: ollama.Client) -> None:
    generated = client.generate(model=SEER, prompt="what is this", images=[PNG, b"abc"])
    chatted = client.chat(model=SEER, messages=[{"role": "user", "content": "and now", "images": [PNG]},
                                                 {"role": "assistant", "content": "a pixel"},
                                                 {"role": "user", "content": "again", "images": [b"xy"]}])  # fmt: skip

    assert len(PNG) == 68
    assert generated.response == "I see 2 image(s): 68, 3 bytes. what is this"
    assert chatted.message.content == "I see 2 image(s): 68, 2 bytes. again"
    assert wired.last_request["/api/generate"]["images"] == [base64.b64encode(PNG).decode(), "YWJj"]


def test_images_on_a_model_without_vision_and_bad_base64_get_400s(client: ollama.Client, http: httpx.Client) -> None:
    refused = refusal(lambda: client.generate(model="llama3", prompt="what is this", images=[PNG]))
    chat = refusal(lambda: client.chat(model="llama3", messages=[{"role": "user", "content": "x", "images": [PNG]}]))
    garbled = http.post("/api/generate", json={"model": SEER, "prompt": "x", "images": ["iVBO!!!!"]})

    assert refused == chat == (400, "this model does not support image input")
    assert (garbled.status_code, garbled.json()) == (400, {"error": "illegal base64 data at input byte 4"})


# --- fill in the middle, raw ---------------------------------------------------------------------------------


def test_a_suffix_fills_in_the_middle_on_a_model_with_insert(client: ollama.Client) -> None:
    filled = client.generate(model=CODER, prompt="def gcd(a, b):", suffix="    return a")
    refused = refusal(lambda: client.generate(model="llama3", prompt="def gcd(a, b):", suffix="    return a"))

    assert (filled.response, filled.done_reason) == ("<fim prefix=14 suffix=12>", "stop")
    assert refused == (400, "registry.ollama.ai/library/llama3:latest does not support insert")


def test_raw_answers_the_prompt_as_is_and_refuses_a_template(wired: FakeOllama, client: ollama.Client) -> None:
    raw = client.generate(model="llama3", prompt="[INST] hi [/INST]", raw=True)
    refused = refusal(lambda: client.generate(model="llama3", prompt="hi", raw=True, system="be brief"))

    assert raw.response == "[INST] hi [/INST]"
    assert refused == (400, "raw mode does not support template, system, or context")
    assert wired.received[-2] == ("/api/generate", {"model": "llama3", "prompt": "[INST] hi [/INST]", "raw": True,
                                                     "stream": False})  # fmt: skip


# --- embeddings ----------------------------------------------------------------------------------------------


def test_embed_answers_deterministic_unit_vectors(wired: FakeOllama, client: ollama.Client) -> None:
    many = client.embed(model="minilm", input=["the sky", "is blue today"])
    one = client.embed(model="minilm", input="the sky", dimensions=3)
    again = client.embed(model="minilm", input=["the sky"])

    assert many.model == "minilm"
    assert [len(v) for v in many.embeddings] == [8, 8]
    assert [round(math.fsum(x * x for x in v), 9) for v in many.embeddings] == [1.0, 1.0]
    assert many.embeddings[0] != many.embeddings[1]
    assert list(again.embeddings[0]) == list(many.embeddings[0]) == embedding("the sky", 8)
    assert (many.prompt_eval_count, many.total_duration, many.load_duration) == (5, 2000, 1000)
    assert list(one.embeddings[0]) == embedding("the sky", 8, 3)
    assert round(math.fsum(x * x for x in one.embeddings[0]), 9) == 1.0
    wired.embedding_length = 16
    assert len(client.embed(model="minilm", input="x").embeddings[0]) == 16


def test_the_older_embeddings_route_and_refusals(client: ollama.Client, http: httpx.Client) -> None:
    older = client.embeddings(model="minilm", prompt="the sky")
    empty = http.post("/api/embed", json={"model": "minilm", "input": []})
    not_embedding = refusal(lambda: client.embed(model="llama3", input="the sky"))
    missing = refusal(lambda: client.embed(model="nomic-embed-text", input="the sky"))
    bad_input = http.post("/api/embed", json={"model": "minilm", "input": [1, 2]})

    assert list(older.embedding) == embedding("the sky", 8)
    assert empty.json() == {"model": "minilm", "embeddings": []}
    assert not_embedding == (400, "registry.ollama.ai/library/llama3:latest does not support embedding")
    assert missing == (404, "model 'nomic-embed-text' not found")
    assert (bad_input.status_code, bad_input.json()) == (400, {"error": "invalid input type"})


# --- show, tags, ps, keep_alive ------------------------------------------------------------------------------


def test_show_reports_capabilities_and_model_info(wired: FakeOllama, client: ollama.Client) -> None:
    thinker, default = client.show(THINKER), client.show("llama3:latest")

    assert thinker.capabilities == ["completion", "tools", "thinking"]
    assert default.capabilities == ["completion", "tools"]
    assert default.modified_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert default.modelinfo == {"general.architecture": "llama", "general.parameter_count": 1_100_000_000,
                                 "llama.context_length": 4096, "llama.embedding_length": 8}  # fmt: skip


def test_tags_and_ps_carry_ollamas_fields(wired: FakeOllama, client: ollama.Client, http: httpx.Client) -> None:
    listed = client.list().models
    running = http.get("/api/ps").json()["models"]

    assert all(re.fullmatch(r"[0-9a-f]{64}", m.digest or "") for m in listed)
    assert len({m.digest for m in listed}) == len(listed)
    assert listed[0].modified_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert len(running) == 1
    entry = running[0]
    assert set(entry) == {"name", "model", "size", "digest", "details", "expires_at", "size_vram", "context_length"}
    assert (entry["name"], entry["model"], entry["size_vram"], entry["context_length"]) == (
        "tinyllama:1.1b-chat", "tinyllama:1.1b-chat", 1000, 4096
    )  # fmt: skip
    assert entry["digest"] == listed[0].digest
    expires = datetime.fromisoformat(entry["expires_at"]) - datetime.now(UTC)
    assert timedelta(minutes=4) < expires <= timedelta(minutes=5)


def test_keep_alive_is_recorded_and_sets_expiry(wired: FakeOllama, client: ollama.Client) -> None:
    client.generate(model="tinyllama:1.1b-chat", prompt="hi", keep_alive="1h")
    hour = client.ps().models[0].expires_at
    client.chat(model="tinyllama:1.1b-chat", messages=[{"role": "user", "content": "hi"}], keep_alive=-1)
    forever = client.ps().models[0].expires_at

    assert wired.keep_alive == {"tinyllama:1.1b-chat": -1}
    assert hour is not None and forever is not None
    assert timedelta(minutes=59) < hour - datetime.now(UTC) <= timedelta(hours=1)
    assert forever.year > 2300  # Ollama's "forever": time.Duration's largest value


def test_keep_alive_zero_unloads_and_a_later_request_loads_again(wired: FakeOllama, client: ollama.Client) -> None:
    model = "tinyllama:1.1b-chat"

    unloaded = client.generate(model=model, keep_alive=0)
    after_generate = client.ps().models
    loaded = client.chat(model=model, messages=[])
    back = [m.model for m in client.ps().models]
    chat_unloaded = client.chat(model=model, messages=[], keep_alive="0s")
    after_chat = client.ps().models
    answered = client.generate(model=model, prompt="last one", keep_alive=0)

    assert (unloaded.done, unloaded.done_reason, unloaded.response) == (True, "unload", "")
    assert after_generate == []
    assert (loaded.done_reason, loaded.message.content) == ("load", "")
    assert back == [model]
    assert (chat_unloaded.done_reason, chat_unloaded.message.role) == ("unload", "assistant")
    assert after_chat == []
    assert answered.response == "last one"
    assert client.ps().models == []  # answered, then unloaded, as Ollama does with keep_alive 0
    assert (wired.unloads, wired.loads) == (2, 1)


def test_a_keep_alive_ollama_cannot_read_is_its_400(http: httpx.Client) -> None:
    unitless = http.post("/api/generate", json={"model": "llama3", "prompt": "x", "keep_alive": "10"})
    boolean = http.post("/api/chat", json={"model": "llama3", "messages": [], "keep_alive": True})

    assert (unitless.status_code, unitless.json()) == (400, {"error": 'time: missing unit in duration "10"'})
    assert (boolean.status_code, boolean.json()) == (400, {"error": "Unsupported type: 'bool'"})
    assert go_duration_seconds("1h30m") == 5400.0
    assert go_duration_seconds(".5s") == 0.5
    with pytest.raises(ValueError, match='unknown unit "d" in duration "1d"'):
        go_duration_seconds("1d")


# --- the done line, stream false, what was forwarded -------------------------------------------------------


def test_the_done_line_has_ollamas_fields_and_stream_false_one_object(http: httpx.Client) -> None:
    streamed = lines(
        http.post("/api/generate", json={"model": "llama3", "prompt": "a b c", "options": {"num_predict": 2}})
    )
    whole = http.post("/api/generate", json={"model": "llama3", "prompt": "a b c", "stream": False})

    done = streamed[-1]
    assert set(done) == DONE_FIELDS - {"message"} | {"response"}
    assert (done["done"], done["done_reason"], done["eval_count"], done["prompt_eval_count"]) == (True, "length", 2, 3)
    assert whole.headers["content-type"] == "application/json; charset=utf-8"
    body = whole.json()
    assert (body["response"], body["done"], body["done_reason"], body["eval_count"]) == ("a b c", True, "stop", 3)
    assert set(body) == DONE_FIELDS - {"message"} | {"response"}


def test_every_forwarded_field_is_recorded_as_parsed_json(wired: FakeOllama, client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    client.chat(model=THINKER, messages=[{"role": "user", "content": "hi"}], think="low", format=schema,
                keep_alive="10m", options={"temperature": 0, "num_ctx": 2048})  # fmt: skip
    client.generate(model=CODER, prompt="a", suffix="b", options={"seed": 7})

    assert wired.last_request["/api/chat"] == {
        "model": THINKER, "stream": False, "messages": [{"role": "user", "content": "hi"}], "format": schema,
        "options": {"temperature": 0, "num_ctx": 2048}, "keep_alive": "10m", "think": "low", "tools": [],
    }  # fmt: skip
    assert wired.last_request["/api/generate"] == {
        "model": CODER, "prompt": "a", "suffix": "b", "stream": False, "options": {"seed": 7}
    }  # fmt: skip
    assert [path for path, _ in wired.received] == ["/api/chat", "/api/generate"]
    assert [orjson.loads(raw) for _, raw in wired.raw_requests] == [body for _, body in wired.received]
    # `requests` is unchanged: generate and chat payloads, a chat's with its prompt and `chat` added.
    assert [(r.get("chat"), r["prompt"]) for r in wired.requests] == [(True, "hi"), (None, "a")]
