"""What MiniVault does itself for the embedded engine, where llama.cpp does not do it for the bundled model.

SmolLM2's chat template renders neither `tools` nor tool calls, so xllamacpp's server ignores `tools` and does
not enforce `tool_choice`. MiniVault offers tools the way llama.cpp's own "generic" tool-call format does: the
tools are described in a system message, the answer is constrained by a JSON schema (`tool_call_schema`) to
`{"tool_call": {"name", "arguments"}}`, `{"tool_calls": [...]}` or `{"response": "..."}`, and the answer is
turned back into tool calls (`parse_tool_answer`). `fit_messages` trims a conversation to the context window.

Everything here is pure: no engine, no I/O (token counting is the caller's callable).
"""

import inspect
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from app.errors import ContextTooLong

# Ollama options the engine fixes when it loads the model: no request can change them.
LOAD_TIME_OPTIONS = frozenset(
    {
        "num_ctx",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "num_batch",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "logits_all",
        "embedding_only",
        "rope_frequency_base",
        "rope_frequency_scale",
    }
)

# Ollama option -> llama.cpp server request field, each checked against the engine's echo of its settings.
ENGINE_OPTION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
    "num_keep": "n_keep",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}

# What the model is told with the tools; the schema enforces the shape, this tells it what the fields mean.
TOOL_INSTRUCTION = (
    "Respond in JSON format, either with `tool_call` (a request to call a tool) "
    "or with `response` (a reply to the user's request)."
)
TOOL_REQUIRED_INSTRUCTION = "Respond in JSON format with `tool_call` (a request to call a tool)."
TOOL_PARALLEL_INSTRUCTION = "Respond in JSON format with `tool_calls` (a list of requests to call tools)."
TOOL_PARALLEL_AUTO_INSTRUCTION = (
    "Respond in JSON format, either with `tool_calls` (a list of requests to call tools) "
    "or with `response` (a reply to the user's request)."
)

_WHITESPACE = " \t\n\r"
_RESPONSE_DEFS = ".response"
_RESPONSE_HEAD = re.compile(r'\s*\{\s*"response"\s*:\s*"')
# Far enough into a constrained answer to know its shape: the first key's first letter (tool_call/s or response),
# and for a response the first character of its value.
_SHAPE = re.compile(r'\s*\{\s*"(?:t|response"\s*:\s*(\S))')
# The longest JSON string escape (`\uXXXX`): a cut inside one leaves at most this many characters undecodable.
_LONGEST_ESCAPE = 6
_DECODER = json.JSONDecoder()
_DEFS_KEYS = ("$defs", "definitions")

Message = TypeVar("Message", bound=Mapping[str, Any])


class ContextOverflow(ContextTooLong):
    """The system messages and the newest user turn alone need more tokens than the context leaves."""

    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(
            f"the conversation's newest message needs {needed} tokens with its system prompt, but the embedded "
            f"engine's context leaves {budget}; shorten the message, or raise MINIVAULT_EMBEDDED_CONTEXT"
        )
        self.needed = needed
        self.budget = budget
        self.param = "messages"


def _functions(tools: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    functions = []
    for index, tool in enumerate(tools):
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, Mapping):
            raise ValueError(f"tools[{index}]: only function tools are supported")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{index}].function.name: required")
        functions.append(function)
    if not functions:
        raise ValueError("tools: at least one tool is required")
    return functions


def _pointer_token(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _rewrite_refs(node: Any, prefix: str, root_ref: str | None) -> Any:
    """Point a tool's local `$ref`s at its definitions hoisted into the wrapper's `$defs`."""
    if isinstance(node, list):
        return [_rewrite_refs(item, prefix, root_ref) for item in node]
    if not isinstance(node, Mapping):
        return node
    rewritten = {key: _rewrite_refs(value, prefix, root_ref) for key, value in node.items()}
    ref = node.get("$ref")
    if isinstance(ref, str):
        if ref == "#" and root_ref is not None:
            rewritten["$ref"] = root_ref
        for key in _DEFS_KEYS:
            head = f"#/{key}/"
            if ref.startswith(head):
                rewritten["$ref"] = f"#/$defs/{_pointer_token(prefix)}.{ref[len(head) :]}"
    return rewritten


def _refers_to_root(node: Any) -> bool:
    if isinstance(node, list):
        return any(_refers_to_root(item) for item in node)
    if not isinstance(node, Mapping):
        return False
    return node.get("$ref") == "#" or any(_refers_to_root(value) for value in node.values())


def _arguments_schema(function: Mapping[str, Any], defs: dict[str, Any]) -> Any:
    """The tool's parameters, with its `$defs` moved into `defs`: inside the wrapper, `#/...` is the wrapper."""
    name = function["name"]
    # No parameters is OpenAI's "takes no arguments": only {} may follow, not whatever the model invents.
    parameters = function.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
    if not isinstance(parameters, Mapping):
        raise ValueError(f"tool {name}: parameters must be a JSON schema object")
    root_ref = f"#/$defs/{_pointer_token(name)}" if _refers_to_root(parameters) else None
    body = {key: value for key, value in parameters.items() if key not in _DEFS_KEYS}
    for key in _DEFS_KEYS:
        for def_name, definition in (parameters.get(key) or {}).items():
            defs[f"{name}.{def_name}"] = _rewrite_refs(definition, name, root_ref)
    body = _rewrite_refs(body, name, root_ref)
    if root_ref is None:
        return body
    defs[name] = body
    return {"$ref": root_ref}


def _wrapper(key: str, value: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": False}


def tool_call_schema(
    tools: Sequence[Mapping[str, Any]],
    choice: str | None,
    named: str | None,
    parallel: bool,
    *,
    max_calls: int | None = None,
    response: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON schema an answer must follow: a call (choice "required" or a named tool) or, on "auto", a call
    or a `response` (text, or what the `response` schema allows); `parallel` asks for `{"tool_calls": [...]}`
    (at most `max_calls`) rather than one `{"tool_call": ...}`."""
    if choice not in (None, "auto", "required"):
        raise ValueError(f"tool_choice {choice!r}: expected 'auto', 'required' or a named function")
    functions = _functions(tools)
    if named is not None:
        functions = [function for function in functions if function["name"] == named]
        if not functions:
            raise ValueError(f"tool_choice names {named!r}, which is not among the tools")
    defs: dict[str, Any] = {}
    calls = []
    for function in functions:
        call: dict[str, Any] = {
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": function["name"]},
                "arguments": _arguments_schema(function, defs),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        if isinstance(function.get("description"), str):
            call["description"] = function["description"]
        calls.append(call)
    one_call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if parallel:
        calls_schema: dict[str, Any] = {"type": "array", "items": one_call, "minItems": 1}
        if max_calls is not None:
            # A small model repeats the same call until max_tokens cuts the JSON short; a cap lets it close.
            calls_schema["maxItems"] = max_calls
        schema = _wrapper("tool_calls", calls_schema)
    else:
        schema = _wrapper("tool_call", one_call)
    if named is None and choice != "required":
        # No tool name starts with a dot (^[A-Za-z0-9_-]{1,64}$), so the response's $defs never meet a tool's.
        reply = {"type": "string"}
        if response is not None:
            reply = _arguments_schema({"name": _RESPONSE_DEFS, "parameters": response}, defs)
        schema = {"anyOf": [schema, _wrapper("response", reply)]}
    if defs:
        schema["$defs"] = defs
    return schema


def tool_instruction(tools: Sequence[Mapping[str, Any]], choice: str | None, named: str | None, parallel: bool) -> str:
    """The system message text that offers the tools, since the bundled model's template does not render them."""
    functions = _functions(tools)
    if named is not None:
        functions = [function for function in functions if function["name"] == named]
    listing = "\n".join(
        json.dumps(
            {"name": f["name"], "description": f.get("description", ""), "parameters": f.get("parameters") or {}},
            ensure_ascii=False,
        )
        for f in functions
    )
    forced = named is not None or choice == "required"
    if parallel:
        instruction = TOOL_PARALLEL_INSTRUCTION if forced else TOOL_PARALLEL_AUTO_INSTRUCTION
    else:
        instruction = TOOL_REQUIRED_INSTRUCTION if forced else TOOL_INSTRUCTION
    return f"You can call these tools:\n{listing}\n{instruction}"


def tool_history(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages the bundled template can render: an assistant's tool calls become the JSON it would have answered,
    so the model sees its own earlier calls (the template renders `content` only); text beside the calls goes,
    as the generic format holds a call or a response, never both."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") != "assistant" or not calls:
            rendered.append(dict(message))
            continue
        texts = []
        for call in calls:
            function = call.get("function") or {}
            arguments = function.get("arguments", "{}")
            # OpenAI sends arguments as JSON text, Ollama as an object; either way the model sees the object.
            arguments_text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            texts.append(f'{{"name": {json.dumps(function.get("name", ""))}, "arguments": {arguments_text}}}')
        if len(texts) == 1:
            content = f'{{"tool_call": {texts[0]}}}'
        else:
            content = '{"tool_calls": [' + ", ".join(texts) + "]}"
        rendered.append({key: value for key, value in message.items() if key != "tool_calls"} | {"content": content})
    return rendered


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _expect(text: str, pos: int, char: str) -> int:
    pos = _skip(text, pos)
    if not text.startswith(char, pos):
        raise ValueError(f"expected {char!r} at {pos}")
    return pos + 1


def _members(text: str, pos: int) -> tuple[dict[str, tuple[Any, int, int]], int]:
    """An object's members as key -> (value, start, end) in `text`, and the offset after its `}`."""
    pos = _expect(text, pos, "{")
    members: dict[str, tuple[Any, int, int]] = {}
    if text.startswith("}", _skip(text, pos)):
        return members, _skip(text, pos) + 1
    while True:
        key, pos = _DECODER.raw_decode(text, _skip(text, pos))
        if not isinstance(key, str):
            raise ValueError(f"object key expected before {pos}")
        start = _skip(text, _expect(text, pos, ":"))
        value, pos = _DECODER.raw_decode(text, start)
        members[key] = (value, start, pos)
        pos = _skip(text, pos)
        if text.startswith("}", pos):
            return members, pos + 1
        pos = _expect(text, pos, ",")


def _items(text: str, pos: int) -> list[int]:
    """The start offsets of an array's items."""
    pos = _expect(text, pos, "[")
    starts: list[int] = []
    if text.startswith("]", _skip(text, pos)):
        return starts
    while True:
        start = _skip(text, pos)
        _, pos = _DECODER.raw_decode(text, start)
        starts.append(start)
        pos = _skip(text, pos)
        if text.startswith("]", pos):
            return starts
        pos = _expect(text, pos, ",")


def _call(text: str, pos: int) -> tuple[str, str]:
    members, _ = _members(text, pos)
    name = members.get("name", (None, 0, 0))[0]
    if not isinstance(name, str) or "arguments" not in members:
        raise ValueError("a tool call needs a name and arguments")
    arguments, start, end = members["arguments"]
    if not isinstance(arguments, dict):
        raise ValueError("a tool call's arguments must be an object")
    return name, text[start:end]


def parse_tool_answer(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(content, [(name, arguments JSON text as the model wrote it)]) from an answer in the generic format;
    text in no such shape (a truncated answer, say) comes back whole as the content, with no calls."""
    try:
        members, end = _members(text, _skip(text, 0))
        if _skip(text, end) != len(text):
            raise ValueError("text after the answer's JSON")
        if "tool_calls" in members:
            calls, start, _ = members["tool_calls"]
            if not isinstance(calls, list) or not calls:
                raise ValueError("tool_calls must be a non-empty list")
            return "", [_call(text, item) for item in _items(text, start)]
        if "tool_call" in members:
            return "", [_call(text, members["tool_call"][1])]
        if "response" in members:
            response, start, end = members["response"]
            return (response if isinstance(response, str) else text[start:end]), []
    except ValueError:  # json.JSONDecodeError is one
        pass
    return text, []


def partial_response(text: str) -> str | None:
    """The text of a `{"response": "...` answer the token limit cut short, decoded as far as it goes; None when
    `text` does not start so."""
    head = _RESPONSE_HEAD.match(text)
    if head is None:
        return None
    body = text[head.end() :]
    # A cut inside an escape (a lone backslash, `\u00`) leaves a tail that does not decode: shorten it until it does.
    for end in range(len(body), max(len(body) - _LONGEST_ESCAPE, 0) - 1, -1):
        try:
            decoded, _ = _DECODER.raw_decode(f'"{body[:end]}"')
        except ValueError:
            continue
        if decoded and "\ud800" <= decoded[-1] <= "\udbff":
            decoded = decoded[:-1]  # half a surrogate pair (`\ud83d`): the other half was cut off
        return str(decoded)
    return None


class ToolAnswer:
    """A constrained answer as it streams: a text `response` is released as far as it decodes, so a reply with
    tools on offer still streams; calls (and a structured response) wait for the whole answer."""

    __slots__ = ("_parts", "_sent", "_streaming")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._sent = 0  # characters of the response already released
        self._streaming: bool | None = None  # undecided until the answer's shape shows

    def feed(self, text: str) -> str:
        """Take the next piece; returns the response text it completes ("" while buffering)."""
        self._parts.append(text)
        if self._streaming is False:
            return ""
        joined = "".join(self._parts)
        if self._streaming is None:
            shape = _SHAPE.match(joined)
            if shape is None:
                return ""
            self._streaming = shape.group(1) == '"'
            if not self._streaming:
                return ""
        decoded = partial_response(joined) or ""
        released, self._sent = decoded[self._sent :], max(self._sent, len(decoded))
        return released

    def finish(self, cut: bool) -> tuple[str, list[tuple[str, str]]]:
        """The rest of the text not yet released, and the calls; `cut`: the token limit ended the answer."""
        text = "".join(self._parts)
        content, calls = parse_tool_answer(text)
        if calls:
            return "", calls
        if self._streaming or cut:
            # Decoded the way the released part was (a whole response decodes to its content all the same).
            partial = partial_response(text)
            content = content if partial is None else partial
        return content[self._sent :], []


async def _count(count_tokens: Callable[[Message], int | Awaitable[int]], message: Message) -> int:
    counted = count_tokens(message)
    return await counted if inspect.isawaitable(counted) else counted


async def fit_messages(
    messages: Sequence[Message], count_tokens: Callable[[Message], int | Awaitable[int]], budget: int
) -> tuple[list[Message], int]:
    """The system messages and the newest turns whose tokens fit in `budget`, and how many older ones were dropped.

    `count_tokens(message)` (sync or async) is called at most once per message, newest first, and no further
    back than the first message that does not fit. Everything from the newest user message on is always kept;
    if that cannot fit with the system messages, ContextOverflow. A tool result whose call was dropped goes too.
    """
    systems = [i for i, message in enumerate(messages) if message.get("role") == "system"]
    others = [i for i, message in enumerate(messages) if message.get("role") != "system"]
    users = [position for position, i in enumerate(others) if messages[i].get("role") == "user"]
    # others[newest:] is the turn being answered: the newest user message and what follows it (tool results).
    newest = users[-1] if users else max(len(others) - 1, 0)
    used = 0
    for i in systems + others[newest:]:
        used += await _count(count_tokens, messages[i])
    if used > budget:
        raise ContextOverflow(used, budget)
    start = newest
    while start > 0:
        cost = await _count(count_tokens, messages[others[start - 1]])
        if used + cost > budget:
            break
        used += cost
        start -= 1
    if start > 0:
        # A tool result whose call was dropped means nothing to the model.
        while start < newest and messages[others[start]].get("role") == "tool":
            start += 1
    kept_indices = set(systems) | set(others[start:])
    kept = [message for i, message in enumerate(messages) if i in kept_indices]
    return kept, len(messages) - len(kept)
