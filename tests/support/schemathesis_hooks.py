"""Schemathesis hooks for tests/test_schemathesis.py: rules of a request its JSON schema cannot state, each applied
to its operations' positive cases only (a negative case stays as generated).

Mapped, so the shape is still sent: a named `tool_choice` not among `tools`; an earlier call's arguments that are
no JSON object's text (Ollama's calls hold an object). Dropped: a JSON schema holding an integer beyond 64 bits
(no upstream could be sent it); a history search over MINIVAULT_HISTORY_MAX_TERMS or MIN_PREFIX (its 422).
"""

from typing import Any

import orjson
import schemathesis
from schemathesis import Case, GenerationMode, HookContext

from app.errors import InvalidRequest
from app.store.sqlite_history import SearchBudget, search_terms
from app.vocabulary import json_object


def _positive(case: Case) -> bool:
    return case.meta is None or case.meta.generation.mode is GenerationMode.POSITIVE


# `apply_to` is attached at run time, out of sight of schemathesis' type hints.
@schemathesis.hook("map_case").apply_to(method="POST", path="/v1/chat/completions")  # type: ignore[attr-defined]
def offered_choice_and_object_arguments(context: HookContext, case: Case) -> Case:
    """A positive case's named tool choice made one of its tools, and its calls' arguments JSON objects."""
    body: Any = case.body
    if not _positive(case) or not isinstance(body, dict):
        return case
    choice, tools = body.get("tool_choice"), body.get("tools")
    if isinstance(choice, dict) and isinstance(tools, list) and tools:
        offered = [tool["function"]["name"] for tool in tools]
        if choice["function"]["name"] not in offered:
            body["tool_choice"] = {**choice, "function": {**choice["function"], "name": offered[0]}}
    for message in body.get("messages") or ():
        if message.get("role") != "assistant":
            continue
        for call in message.get("tool_calls") or ():
            function: dict[str, Any] = call["function"]
            if function["arguments"].strip() and not json_object(function["arguments"]):
                function["arguments"] = "{}"
    # Assigned back, so schemathesis knows the body changed.
    case.body = body
    return case


def _writable(value: object) -> bool:
    """Whether orjson can write `value`, as MiniVault checks a JSON schema before it is passed on."""
    try:
        orjson.dumps(value)
    except TypeError:
        return False
    return True


@schemathesis.hook("filter_case").apply_to(  # type: ignore[attr-defined]
    method="POST", path=["/v1/chat/completions", "/api/chat", "/api/generate", "/generate"]
)
def schemas_within_64_bits(context: HookContext, case: Case) -> bool:
    """Keep a positive case only if each JSON schema it sends can be written: no integer beyond 64 bits."""
    body: Any = case.body
    if not _positive(case) or not isinstance(body, dict):
        return True
    schemas: list[object] = [body.get("format")]
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and isinstance(response_format.get("json_schema"), dict):
        schemas.append(response_format["json_schema"].get("schema"))
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        function = tool.get("function") if isinstance(tool, dict) else None
        schemas.append(function.get("parameters") if isinstance(function, dict) else None)
    return all(_writable(schema) for schema in schemas)


@schemathesis.hook("filter_case").apply_to(method="GET", path="/history")  # type: ignore[attr-defined]
def search_within_budget(context: HookContext, case: Case) -> bool:
    """Keep a positive case only if its `q` is a search the default budget allows (MiniVault's own count)."""
    q: Any = (case.query or {}).get("q")
    if not _positive(case) or not isinstance(q, str):
        return True
    try:
        search_terms(q, SearchBudget())
    except InvalidRequest:
        return False
    return True
