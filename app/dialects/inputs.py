"""Checks every dialect makes on what a body asks beyond text: images, tools and JSON schemas.

Each raises InvalidRequest naming the field (as the dialect spells it), so a bad image or tool is a 4xx in
the dialect's shape, logged, and never sent upstream.
"""

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

import jsonschema_rs
import orjson

from app.errors import InvalidRequest
from app.vocabulary import IMAGE_TYPES, Image, image_type

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w-]+=[^;,]*)*;base64,", re.ASCII)


_DRAFTS = {
    "http://json-schema.org/draft-04/schema", "http://json-schema.org/draft-06/schema",
    "http://json-schema.org/draft-07/schema", "https://json-schema.org/draft/2019-09/schema",
    "https://json-schema.org/draft/2020-12/schema",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class InputLimits:
    """The bounds a parsed body is held to (from the settings)."""

    max_prompt_chars: int
    max_image_bytes: int


def invalid(message: str, param: str | None = None) -> InvalidRequest:
    """An InvalidRequest whose `param` names the field (OpenAI's error body shows it)."""
    error = InvalidRequest(message)
    error.param = param
    return error


def base64_image(text: object, field: str, limits: InputLimits) -> Image:
    """A base64 image (Ollama's `images`), checked: valid base64, PNG/JPEG/WebP/GIF by its bytes, within the limit."""
    if not isinstance(text, str):
        raise invalid(f"{field}: must be a base64 string", field)
    # Decoded size without decoding: refuse an oversized image before allocating it.
    if len(text) // 4 * 3 > limits.max_image_bytes + 3:
        raise invalid(_too_large(field, len(text) // 4 * 3, limits), field)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{field}: not valid base64; send the image's bytes base64-encoded, without a data: prefix",
                      field) from None  # fmt: skip
    return _image(data, field, limits)


def data_url_image(url: object, field: str, limits: InputLimits) -> Image:
    """An image given as a `data:` URL (OpenAI's `image_url.url`); any other URL is refused, never fetched."""
    if not isinstance(url, str):
        raise invalid(f"{field}: must be a string", field)
    match = _DATA_URL.match(url)
    if match is None:
        if url.startswith(("http://", "https://")):
            raise invalid(
                f"{field}: MiniVault does not fetch URLs on a client's behalf; send the image inline as a "
                "data: URL (data:image/png;base64,...)",
                field,
            )
        raise invalid(f"{field}: must be a data: URL with base64 bytes (data:image/png;base64,...)", field)
    return base64_image(url[match.end() :], field, limits)


def _image(data: bytes, field: str, limits: InputLimits) -> Image:
    if len(data) > limits.max_image_bytes:
        raise invalid(_too_large(field, len(data), limits), field)
    media_type = image_type(data)
    if media_type is None:
        raise invalid(f"{field}: not a {', '.join(t.split('/')[1].upper() for t in IMAGE_TYPES)} image by its bytes",
                      field)  # fmt: skip
    return Image(data, media_type)


def _too_large(field: str, size: int, limits: InputLimits) -> str:
    return (
        f"{field}: the image is about {size} bytes; the limit is {limits.max_image_bytes} (MINIVAULT_MAX_IMAGE_BYTES)"
    )


def tool_name(name: object, field: str) -> str:
    """A function name as OpenAI and Ollama accept it: 1 to 64 letters, digits, `_` or `-`."""
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise invalid(f"{field}: must be 1 to 64 letters, digits, underscores or hyphens (got {name!r:.80})", field)
    return name


def json_schema(schema: object, field: str) -> dict[str, Any]:
    """A JSON schema given as an object (a tool's parameters, an output format), valid against its metaschema."""
    if not isinstance(schema, dict):
        raise invalid(f"{field}: must be a JSON schema object, like {{\"type\": \"object\", \"properties\": {{}}}}",
                      field)  # fmt: skip
    dialect = schema.get("$schema")
    if dialect is not None and (not isinstance(dialect, str) or dialect.rstrip("#") not in _DRAFTS):
        # An unknown draft would make the checker fetch it: MiniVault never fetches a URL on a client's behalf.
        drafts = ", ".join(sorted(_DRAFTS))
        raise invalid(f"{field}.$schema: must be a JSON Schema draft's own URI ({drafts}), or left out", field)
    try:
        orjson.dumps(schema)
    except TypeError:  # an integer beyond 64 bits: no upstream could be sent it, nor the log write it
        raise invalid(f"{field}: holds an integer beyond 64 bits; use a smaller number or a string", field) from None
    try:
        jsonschema_rs.meta.validate(schema)
    except jsonschema_rs.ValidationError as exc:
        where = "".join(f".{part}" if isinstance(part, str) else f"[{part}]" for part in exc.instance_path)
        raise invalid(f"{field}{where}: not a valid JSON schema ({exc.message})", field) from None
    except (ValueError, TypeError) as exc:  # an unknown $schema draft, a reference it cannot resolve
        raise invalid(f"{field}: not a JSON schema MiniVault can check ({exc})", field) from None
    return schema
