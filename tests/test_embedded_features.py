"""What MiniVault does itself for the embedded engine: tool calls through a JSON-schema-constrained answer, and
trimming a conversation to the context. Unit tests of the pure helpers; tests/test_embedded_tools.py proves them
on the real engine, through MiniVault."""

import json
from collections.abc import Mapping
from typing import Any

import jsonschema_rs
import pytest

from app.backends.embedded_features import (
    LOAD_TIME_OPTIONS,
    ContextOverflow,
    ToolAnswer,
    fit_messages,
    parse_tool_answer,
    partial_response,
    tool_call_schema,
    tool_history,
    tool_instruction,
)

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Get the weather in a city", "parameters": WEATHER_PARAMETERS},
}
TIME = {"type": "function", "function": {"name": "now"}}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
WEATHER_CALL = {
    "type": "object",
    "properties": {"name": {"type": "string", "const": "get_weather"}, "arguments": WEATHER_PARAMETERS},
    "required": ["name", "arguments"],
    "additionalProperties": False,
    "description": "Get the weather in a city",
}
TIME_CALL = {
    "type": "object",
    "properties": {"name": {"type": "string", "const": "now"}, "arguments": NO_ARGUMENTS},
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
RESPONSE = {
    "type": "object",
    "properties": {"response": {"type": "string"}},
    "required": ["response"],
    "additionalProperties": False,
}


def wrapper(key: str, value: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": False}


# --- tool_call_schema


def test_required_choice_must_produce_the_one_call() -> None:
    assert tool_call_schema([WEATHER], "required", None, False) == wrapper("tool_call", WEATHER_CALL)


def test_auto_choice_allows_a_call_or_a_text_response() -> None:
    expected = {"anyOf": [wrapper("tool_call", WEATHER_CALL), RESPONSE]}
    assert tool_call_schema([WEATHER], "auto", None, False) == expected
    assert tool_call_schema([WEATHER], None, None, False) == expected  # OpenAI's default with tools is auto


def test_several_tools_are_any_of_their_calls() -> None:
    expected = wrapper("tool_call", {"anyOf": [WEATHER_CALL, TIME_CALL]})
    assert tool_call_schema([WEATHER, TIME], "required", None, False) == expected


def test_a_named_function_is_the_only_call_allowed_even_on_auto() -> None:
    assert tool_call_schema([WEATHER, TIME], "auto", "now", False) == wrapper("tool_call", TIME_CALL)
    assert tool_call_schema([WEATHER, TIME], None, "get_weather", False) == wrapper("tool_call", WEATHER_CALL)


def test_parallel_calls_are_a_list_of_at_least_one_capped_on_request() -> None:
    calls = {"type": "array", "items": WEATHER_CALL, "minItems": 1}
    assert tool_call_schema([WEATHER], "required", None, True) == wrapper("tool_calls", calls)
    capped = tool_call_schema([WEATHER], "auto", None, True, max_calls=2)
    assert capped == {"anyOf": [wrapper("tool_calls", calls | {"maxItems": 2}), RESPONSE]}


def test_a_tools_defs_are_hoisted_to_the_root_and_its_refs_rewritten() -> None:
    parameters = {
        "$defs": {
            "Address": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/Unit"}}},
            "Unit": {"enum": ["c", "f"]},
        },
        "type": "object",
        "properties": {"to": {"$ref": "#/$defs/Address"}, "back": {"$ref": "#/definitions/Unit"}},
    }
    ship = {"type": "function", "function": {"name": "ship", "parameters": parameters}}

    schema = tool_call_schema([ship], "required", None, False)

    arguments = schema["properties"]["tool_call"]["properties"]["arguments"]
    assert arguments == {
        "type": "object",
        "properties": {"to": {"$ref": "#/$defs/ship.Address"}, "back": {"$ref": "#/$defs/ship.Unit"}},
    }
    assert schema["$defs"] == {
        "ship.Address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"$ref": "#/$defs/ship.Unit"}},
        },
        "ship.Unit": {"enum": ["c", "f"]},
    }
    call = {"tool_call": {"name": "ship", "arguments": {"to": {"city": "Oslo", "unit": "c"}, "back": "f"}}}
    assert jsonschema_rs.is_valid(schema, call)
    assert not jsonschema_rs.is_valid(schema, {"tool_call": {"name": "ship", "arguments": {"back": "k"}}})


def test_a_recursive_tool_refers_to_its_own_hoisted_copy() -> None:
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}
    tool = {"type": "function", "function": {"name": "tree", "parameters": tree}}
    schema = tool_call_schema([tool], "required", None, False)

    assert schema["properties"]["tool_call"]["properties"]["arguments"] == {"$ref": "#/$defs/tree"}
    assert schema["$defs"] == {
        "tree": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/tree"}}}}
    }
    assert jsonschema_rs.is_valid(schema, {"tool_call": {"name": "tree", "arguments": {"kids": [{"kids": []}]}}})
    assert not jsonschema_rs.is_valid(schema, {"tool_call": {"name": "tree", "arguments": {"kids": [1]}}})


def test_an_auto_response_may_follow_a_schema_whose_defs_join_the_tools() -> None:
    person = {
        "$defs": {"Age": {"type": "integer", "minimum": 0}},
        "type": "object",
        "properties": {"age": {"$ref": "#/$defs/Age"}},
        "required": ["age"],
    }
    schema = tool_call_schema([WEATHER], "auto", None, False, response=person)

    assert schema["anyOf"][1] == wrapper(
        "response",
        {"type": "object", "properties": {"age": {"$ref": "#/$defs/.response.Age"}}, "required": ["age"]},
    )
    assert schema["$defs"] == {".response.Age": {"type": "integer", "minimum": 0}}
    assert jsonschema_rs.is_valid(schema, {"response": {"age": 3}})
    assert not jsonschema_rs.is_valid(schema, {"response": {"age": -1}})
    assert not jsonschema_rs.is_valid(schema, {"response": "text"})
    # A forced call has no response branch to constrain.
    assert tool_call_schema([WEATHER], "required", None, False, response=person) == wrapper("tool_call", WEATHER_CALL)


@pytest.mark.parametrize(
    ("tools", "choice", "named", "message"),
    [
        ([], "auto", None, "tools: at least one tool is required"),
        ([{"type": "retrieval"}], "auto", None, "tools[0]: only function tools are supported"),
        ([{"type": "function", "function": {"description": "x"}}], "auto", None, "tools[0].function.name: required"),
        ([WEATHER], "none", None, "tool_choice 'none': expected 'auto', 'required' or a named function"),
        ([WEATHER], None, "fly", "tool_choice names 'fly', which is not among the tools"),
    ],
)
def test_what_cannot_be_a_schema_is_refused(
    tools: list[dict[str, Any]], choice: str | None, named: str | None, message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        tool_call_schema(tools, choice, named, False)
    assert str(raised.value) == message


def test_the_instruction_lists_the_tools_and_the_answer_shape() -> None:
    assert tool_instruction([WEATHER, TIME], "required", None, False) == (
        "You can call these tools:\n"
        '{"name": "get_weather", "description": "Get the weather in a city", "parameters": '
        + json.dumps(WEATHER_PARAMETERS)
        + "}\n"
        '{"name": "now", "description": "", "parameters": {}}\n'
        "Respond in JSON format with `tool_call` (a request to call a tool)."
    )
    assert tool_instruction([WEATHER, TIME], "auto", "now", True).splitlines()[1:] == [
        '{"name": "now", "description": "", "parameters": {}}',
        "Respond in JSON format with `tool_calls` (a list of requests to call tools).",
    ]
    assert tool_instruction([WEATHER], "auto", None, False).splitlines()[-1] == (
        "Respond in JSON format, either with `tool_call` (a request to call a tool) "
        "or with `response` (a reply to the user's request)."
    )


def test_earlier_tool_calls_become_the_answer_the_model_would_have_given() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    ollama_call = {"function": {"name": "now", "arguments": {}}}
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "", "tool_calls": [call, ollama_call]},
    ]

    assert tool_history(messages) == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": '{"tool_call": {"name": "get_weather", "arguments": {"city":"Oslo"}}}'},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {
            "role": "assistant",
            "content": '{"tool_calls": [{"name": "get_weather", "arguments": {"city":"Oslo"}}, '
            '{"name": "now", "arguments": {}}]}',
        },
    ]


# --- parse_tool_answer


def test_one_call_keeps_the_arguments_text_exactly_as_written() -> None:
    text = '{"tool_call":{"name": "get_weather", "arguments":{ "city" : "Paris",\n"n": 1.50 }}}'
    assert parse_tool_answer(text) == ("", [("get_weather", '{ "city" : "Paris",\n"n": 1.50 }')])


def test_pretty_printed_answer_with_surrounding_whitespace() -> None:
    text = '\n {\n  "tool_call": {\n    "name": "now",\n    "arguments": {}\n  }\n}\n'
    assert parse_tool_answer(text) == ("", [("now", "{}")])


def test_several_calls_in_order() -> None:
    text = '{"tool_calls": [ {"name": "a", "arguments": {"x": [1, {"y": "}"}]}} , {"arguments": {}, "name": "b"}]}'
    assert parse_tool_answer(text) == ("", [("a", '{"x": [1, {"y": "}"}]}'), ("b", "{}")])


def test_a_response_is_the_text_content() -> None:
    assert parse_tool_answer('{"response": "Hello \\"you\\" \\u00e9"}') == ('Hello "you" é', [])
    assert parse_tool_answer('{"response": {"a": 1}}') == ('{"a": 1}', [])  # a structured response, as written


@pytest.mark.parametrize(
    "text",
    [
        "Just some words.",
        "",
        '{"tool_call": {"name": "get_weather", "arguments": {"city": "Par',  # cut short by max_tokens
        '{"tool_call": {"name": "get_weather", "arguments": "{\\"city\\": 1}"}}',  # arguments not an object
        '{"tool_call": {"arguments": {}}}',
        '{"tool_calls": []}',
        '{"tool_calls": [{"name": "a", "arguments": {}}, 3]}',
        '{"other": 1}',
        '{"response": "x"} and more',
        "[1, 2]",
    ],
)
def test_anything_else_is_plain_content_without_calls(text: str) -> None:
    assert parse_tool_answer(text) == (text, [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"response": "Hello wor', "Hello wor"),
        ('{"response": "Hello"', "Hello"),  # only the closing brace missing
        ('  {\n "response" : "caf\\u00e9 \\"ok', 'café "ok'),
        ('{"response": "cut in an escape \\u00', "cut in an escape "),
        ('{"response": "cut after a backslash \\', "cut after a backslash "),
        ('{"response": "', ""),
    ],
)
def test_a_cut_response_is_decoded_as_far_as_it_goes(text: str, expected: str) -> None:
    assert partial_response(text) == expected


@pytest.mark.parametrize("text", ['{"tool_call": {"name": "get_weather", "argu', "plain words", '{"response": 3'])
def test_only_a_response_string_is_a_partial_response(text: str) -> None:
    assert partial_response(text) is None


def feed_all(answer: ToolAnswer, pieces: list[str]) -> list[str]:
    return [answer.feed(piece) for piece in pieces]


def test_a_text_response_is_released_as_it_decodes() -> None:
    answer = ToolAnswer()
    pieces = [" {", '"response"', ': "caf', "\\u00", "e9 ", "\\ud83d", "\\ude00", '!"', "}"]
    assert feed_all(answer, pieces) == ["", "", "caf", "", "é ", "", "\U0001f600", "!", ""]
    assert answer.finish(cut=False) == ("", [])


def test_a_call_and_a_structured_response_wait_for_the_whole_answer() -> None:
    call = ToolAnswer()
    assert feed_all(call, ['{"tool_call": {"name": "now", ', '"arguments": {"response": "x"}}}']) == ["", ""]
    assert call.finish(cut=False) == ("", [("now", '{"response": "x"}')])
    structured = ToolAnswer()
    assert feed_all(structured, ['{"response": ', '{"age": 3}}']) == ["", ""]
    assert structured.finish(cut=False) == ('{"age": 3}', [])


def test_a_cut_answer_ends_with_what_was_written() -> None:
    streamed = ToolAnswer()
    assert feed_all(streamed, ['{"response": "Sunny', " and wa"]) == ["Sunny", " and wa"]
    assert streamed.finish(cut=True) == ("", [])
    call = ToolAnswer()
    feed_all(call, ['{"tool_call": {"name": "get_weather", "argu'])
    assert call.finish(cut=True) == ('{"tool_call": {"name": "get_weather", "argu', [])


# --- fit_messages


def counter(costs: Mapping[str, int], calls: list[str]) -> Any:
    """Counts a message as costs[content], recording which messages were counted."""

    def count(message: Mapping[str, Any]) -> int:
        calls.append(message["content"])
        return costs[message["content"]]

    return count


CONVERSATION = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "content": "a2"},
    {"role": "user", "content": "u3"},
]
COSTS = {"sys": 10, "u1": 20, "a1": 30, "u2": 5, "a2": 15, "u3": 8}


@pytest.mark.anyio
async def test_everything_kept_when_it_fits() -> None:
    calls: list[str] = []
    kept, dropped = await fit_messages(CONVERSATION, counter(COSTS, calls), 88)
    assert (kept, dropped) == (CONVERSATION, 0)
    assert calls == ["sys", "u3", "a2", "u2", "a1", "u1"]  # once each, newest first after the system


@pytest.mark.anyio
async def test_the_oldest_turns_go_first_and_counting_stops_at_the_first_too_big() -> None:
    calls: list[str] = []
    kept, dropped = await fit_messages(CONVERSATION, counter(COSTS, calls), 60)
    assert kept == [CONVERSATION[0], *CONVERSATION[3:]]
    assert dropped == 2
    assert calls == ["sys", "u3", "a2", "u2", "a1"]  # u1 is never counted: a1 already did not fit


@pytest.mark.anyio
async def test_an_async_counter_works_the_same() -> None:
    async def count(message: Mapping[str, Any]) -> int:
        return COSTS[message["content"]]

    kept, dropped = await fit_messages(CONVERSATION, count, 33)
    assert (kept, dropped) == ([CONVERSATION[0], CONVERSATION[-2], CONVERSATION[-1]], 3)


@pytest.mark.anyio
async def test_the_newest_user_message_alone_too_big_is_refused() -> None:
    with pytest.raises(ContextOverflow) as raised:
        await fit_messages(CONVERSATION, counter(COSTS, []), 17)
    assert (raised.value.needed, raised.value.budget) == (18, 17)
    assert (raised.value.status, raised.value.code, raised.value.param) == (400, "context_length_exceeded", "messages")
    assert raised.value.message == (
        "the conversation's newest message needs 18 tokens with its system prompt, but the embedded engine's "
        "context leaves 17; shorten the message, or raise MINIVAULT_EMBEDDED_CONTEXT"
    )


@pytest.mark.anyio
async def test_a_tool_turn_after_the_newest_user_message_is_kept_and_an_orphan_result_dropped() -> None:
    messages = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "call1"},
        {"role": "tool", "content": "result1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "call2"},
        {"role": "tool", "content": "result2"},
    ]
    costs = {"u1": 5, "call1": 50, "result1": 5, "u2": 5, "call2": 5, "result2": 5}

    kept, dropped = await fit_messages(messages, counter(costs, []), 25)

    # result1 fits but its call does not: it goes, and the turn being answered (u2, call2, result2) stays.
    assert (kept, dropped) == (messages[3:], 3)
    with pytest.raises(ContextOverflow):
        await fit_messages(messages, counter(costs, []), 14)


@pytest.mark.anyio
async def test_systems_anywhere_are_kept_and_no_user_message_keeps_the_last() -> None:
    messages = [
        {"role": "assistant", "content": "a1"},
        {"role": "system", "content": "sys"},
        {"role": "assistant", "content": "a2"},
    ]
    kept, dropped = await fit_messages(messages, counter({"a1": 30, "sys": 10, "a2": 15}, []), 30)
    assert (kept, dropped) == (messages[1:], 1)
    assert await fit_messages([], counter({}, []), 0) == ([], 0)


def test_load_time_options_include_ollamas_model_loading_ones() -> None:
    assert {"num_ctx", "num_gpu", "num_thread", "num_batch", "use_mmap"} <= LOAD_TIME_OPTIONS
    assert "num_keep" not in LOAD_TIME_OPTIONS  # llama.cpp takes n_keep per request
