"""The pure parts of the fake Ollama's wire format: the values it derives from a request, kept apart from the server.

Each follows Ollama's own code (server/routes.go, api/types.go) where Ollama decides; where a real model would
decide (an answer to a schema, a vector), the value is deterministic, so tests can assert it exactly.
"""

import base64
import binascii
import hashlib
import math
import re
from typing import Any

import orjson

# Thinking levels Ollama accepts besides true/false (api.ThinkValue).
THINK_LEVELS = ("high", "medium", "low", "max")
# Past this depth an instance takes only what its schema requires, so recursive models ($ref to themselves) end.
_DEEPEST = 6
_STRING_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z", "date": "2026-01-01", "time": "00:00:00", "duration": "PT1S",
    "email": "user@example.com", "idn-email": "user@example.com", "uri": "https://example.com/",
    "iri": "https://example.com/", "uri-reference": "https://example.com/", "hostname": "example.com",
    "ipv4": "127.0.0.1", "ipv6": "::1", "uuid": "00000000-0000-4000-8000-000000000000",
}  # fmt: skip
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_quote(text: str) -> str:
    """A string as Go's %q prints it (enough for model names and durations)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def full_name(model: str) -> str:
    """The name Ollama's capability errors use: `llama3:latest` is `registry.ollama.ai/library/llama3:latest`."""
    parts = model.split("/")
    if len(parts) == 1:
        return f"registry.ollama.ai/library/{model}"
    return f"registry.ollama.ai/{model}" if len(parts) == 2 else model


def think_error(value: object) -> str | None:
    """Ollama's 400 for a `think` that is neither a boolean nor a level; None when it is one (or absent)."""
    if value is None or isinstance(value, bool):
        return None
    levels = '"high", "medium", "low", "max", true, or false'
    if isinstance(value, str):
        return None if value in THINK_LEVELS else f"invalid think value: {go_quote(value)} (must be {levels})"
    return f"think must be a boolean or string ({levels})"


def go_duration_seconds(text: str) -> float:
    """Go's time.ParseDuration, in seconds; ValueError with Go's message for what it refuses."""
    quoted = go_quote(text)
    rest, sign = text, 1.0
    if rest[:1] in ("+", "-"):
        sign, rest = (-1.0 if rest[0] == "-" else 1.0), rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"time: invalid duration {quoted}")
    total = 0.0
    while rest:
        number = re.match(r"\d*(\.\d*)?", rest)
        digits = number.group(0) if number else ""
        if not any(c.isdigit() for c in digits):
            raise ValueError(f"time: invalid duration {quoted}")
        rest = rest[len(digits) :]
        unit = re.match(r"[^\d.]*", rest)
        name = unit.group(0) if unit else ""
        if not name:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if name not in _DURATION_UNITS:
            raise ValueError(f"time: unknown unit {go_quote(name)} in duration {quoted}")
        total += float(digits) * _DURATION_UNITS[name]
        rest = rest[len(name) :]
    return sign * total


def keep_alive_seconds(value: object) -> float | None:
    """`keep_alive` as Ollama reads it: seconds (a number) or a Go duration; negative means forever (inf).
    None when absent or null; ValueError with Ollama's message for anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("Unsupported type: 'bool'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = go_duration_seconds(value)
    else:
        kind = "map[string]interface {}" if isinstance(value, dict) else "[]interface {}"
        raise ValueError(f"Unsupported type: '{kind}'")
    return math.inf if seconds < 0 else seconds


def base64_error(value: object) -> str | None:
    """Go's error for an image that is not standard base64 (Ollama reads `images` as []byte); None when it is."""
    if isinstance(value, str):
        try:
            base64.b64decode(value, validate=True)
            return None
        except (binascii.Error, ValueError):
            pass
        alphabet = re.compile(r"[A-Za-z0-9+/=]")
        position = next((i for i, c in enumerate(value) if not alphabet.match(c)), len(value) // 4 * 4)
        return f"illegal base64 data at input byte {position}"
    return "illegal base64 data at input byte 0"


def embedding(text: str, length: int, dimensions: object = None) -> list[float]:
    """A unit vector of `length` floats drawn from sha256 of the text; `dimensions` cuts and renormalises it,
    as Ollama does when it is smaller than the model's length."""
    values: list[float] = []
    block = hashlib.sha256(text.encode()).digest()
    while len(values) < length:
        values += [(byte - 127.5) / 127.5 for byte in block]
        block = hashlib.sha256(block).digest()
    vector = _normalized(values[:length])
    if isinstance(dimensions, int) and not isinstance(dimensions, bool) and 0 < dimensions < len(vector):
        vector = _normalized(vector[:dimensions])
    return vector


def _normalized(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def tool_call(index: int, scripted: dict[str, Any]) -> dict[str, Any]:
    """One of Ollama's tool calls: `{"id", "function": {"index", "name", "arguments"}}` (Ollama ≥ 0.12 shape).

    `scripted` is `{"name", "arguments", "id"?, "index"?}` or already Ollama's `{"function": {...}, "id"?}`;
    the id Ollama draws at random ("call_" and 8 of [a-z0-9]) is derived from the call here, so it repeats.
    """
    function = scripted.get("function", scripted)
    name, arguments = function["name"], function.get("arguments", {})
    digest = hashlib.sha256(f"{index}:{name}:".encode() + orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS))
    return {
        "id": scripted.get("id") or f"call_{digest.hexdigest()[:8]}",
        "function": {"index": function.get("index", index), "name": name, "arguments": arguments},
    }


def schema_instance(
    schema: object, text: str | None, root: object = None, depth: int = 0, key: str = "",
    following: frozenset[str] = frozenset(),
) -> Any:  # fmt: skip
    """A small value that validates against the JSON schema `schema`: every string is `text` (the property's
    name when `text` is None), numbers the smallest allowed, arrays one item, enums their first value.

    Handles what pydantic's `model_json_schema()` produces: `$defs`/`$ref`, `anyOf` (Optional), `allOf`,
    `enum`/`const`, string formats, numeric bounds, `minItems`/`maxItems`, `minLength`/`maxLength`
    (`pattern` is not honoured).
    """
    root = schema if root is None else root
    if not isinstance(schema, dict):
        return text if text is not None else key  # the `true` schema: anything goes
    ref = schema.get("$ref")
    if isinstance(ref, str):
        # A ref already being followed here (refs that only point at each other) adds nothing more.
        resolved = {} if ref in following else _resolve(root, ref)
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return schema_instance({**resolved, **rest}, text, root, depth, key, following | {ref})
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for combinator in ("anyOf", "oneOf"):
        options = schema.get(combinator)
        if options:
            return schema_instance(_choose(options, depth), text, root, depth, key)
    if schema.get("allOf"):
        parts = [s for s in schema["allOf"] if isinstance(s, dict)]  # `true` adds nothing (`false`: nothing fits)
        merged = _merged([_resolve(root, s["$ref"]) if "$ref" in s else s for s in parts])
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        return schema_instance(_merged([merged, rest]), text, root, depth, key)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((t for t in kind if t != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        properties: dict[str, Any] = schema.get("properties") or {}
        required: list[str] = schema.get("required") or []
        names = list(properties) if depth < _DEEPEST else [n for n in properties if n in required]
        value = {n: schema_instance(properties[n], text, root, depth + 1, n) for n in names}
        value.update({n: text if text is not None else n for n in required if n not in value})
        return value
    if kind == "array":
        prefix = [schema_instance(s, text, root, depth + 1, key) for s in schema.get("prefixItems") or []]
        count = max(schema.get("minItems", 0), 1 if depth < _DEEPEST else 0, len(prefix))
        count = min(count, schema.get("maxItems", count))
        items = schema.get("items", {})
        extra = [schema_instance(items, text, root, depth + 1, key) for _ in range(count - len(prefix))]
        if schema.get("uniqueItems") and len(extra) > 1 and all(isinstance(e, str) for e in extra):
            extra = [f"{e}{i}" for i, e in enumerate(extra)]
        return (prefix + extra)[:count]
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    string = _STRING_FORMATS.get(schema.get("format", ""), text if text is not None else key)
    string = string.ljust(schema.get("minLength", 0), "x")
    return string[: schema["maxLength"]] if "maxLength" in schema else string


def _resolve(root: object, ref: str) -> dict[str, Any]:
    """A local `$ref` (`#/$defs/Name`, `#/definitions/Name`) looked up in the root schema."""
    node: Any = root
    for part in ref.removeprefix("#").strip("/").split("/") if ref.strip("#/") else []:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return {}  # not a local pointer (an anchor, a URL) or one to nothing: it constrains nothing here
    return node if isinstance(node, dict) else {}


def _choose(options: list[Any], depth: int) -> Any:
    """The branch of an anyOf/oneOf to fill: the first that is not null, or null itself once deep enough."""
    nulls = [o for o in options if isinstance(o, dict) and o.get("type") == "null"]
    others = [o for o in options if o not in nulls]
    if nulls and (depth >= _DEEPEST or not others):
        return nulls[0]
    return others[0]


def _merged(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for part in schemas:
        for name, value in part.items():
            if name == "properties":
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif name == "required":
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged[name] = value
    return merged


def _number(schema: dict[str, Any], integer: bool) -> int | float:
    """The smallest value the bounds allow (0 when unbounded below), on `multipleOf` when there is one."""
    step = 1 if integer else 0.5
    low, high = schema.get("minimum"), schema.get("maximum")
    exclusive_low, exclusive_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    # Draft 4 spells the exclusive bounds as booleans beside minimum/maximum.
    if exclusive_low is True and low is not None:
        low, exclusive_low = None, low
    if exclusive_high is True and high is not None:
        high, exclusive_high = None, high
    value: float = 0
    if isinstance(low, int | float):
        value = low
    elif isinstance(exclusive_low, int | float) and not isinstance(exclusive_low, bool):
        value = exclusive_low + step
    if isinstance(high, int | float) and value > high:
        value = high
    if isinstance(exclusive_high, int | float) and not isinstance(exclusive_high, bool) and value >= exclusive_high:
        lower = exclusive_low if isinstance(exclusive_low, int | float) else exclusive_high - 2 * step
        value = exclusive_high - 1 if integer else (lower + exclusive_high) / 2
    multiple = schema.get("multipleOf")
    if isinstance(multiple, int | float) and multiple > 0:
        value = math.ceil(value / multiple) * multiple
    return math.ceil(value) if integer else float(value)
