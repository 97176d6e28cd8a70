"""Who may manage models, and which registries a model name may send Ollama to.

Model management (`/models/pull`, Ollama's `/api/pull`, `push`, `create`, `copy`, `delete`, `blobs`)
changes what every key uses, so it needs an admin key (MINIVAULT_ADMIN_KEYS); with no keys at all,
the one person on the machine keeps it. A model name is also a network destination: Ollama pulls
from, and pushes to, whatever registry host the name starts with. So the names a request would send
to Ollama must be from Ollama's own library (no host) or name a host MINIVAULT_PULL_REGISTRIES lists;
`insecure: true` (no TLS check) and pushing are off unless their settings turn them on. Every check
runs as a route dependency, before a byte is forwarded.
"""

import re
from collections.abc import Callable, Iterator
from typing import Any

import orjson
from fastapi import Depends, Request

from app.config import Settings
from app.errors import Forbidden, InvalidRequest, PushNotAllowed, RegistryNotAllowed
from app.schemas import reject_non_finite
from app.web.auth import is_admin

# Ollama's library: what a name without a host means, always allowed.
LIBRARY_HOST = "registry.ollama.ai"
# `FROM <name>` in an older Ollama's `modelfile` field (instructions are case-insensitive there).
_MODELFILE_FROM = re.compile(r"^[ \t]*FROM[ \t]+\"?([^\s\"]+)", re.IGNORECASE | re.MULTILINE)


def registry_host(name: str) -> str | None:
    """The registry host `name` would make Ollama contact, lower-cased; None for Ollama's own library.

    As Ollama parses names (server/modelpath.go): any `scheme://` is dropped, and with three `/`-parts
    the first is the host. A two-part name whose first part looks like a host (a dot, a colon, or
    `localhost`, as Docker reads image names) counts as one too, though Ollama takes it for a namespace:
    refusing it costs nothing, since library namespaces can hold none of those.
    """
    rest = name.rpartition("://")[2]
    first, slash, tail = rest.partition("/")
    if not slash:
        return None
    host = first.lower()
    if "/" in tail or "." in host or ":" in host or host == "localhost":
        return None if host == LIBRARY_HOST else host
    return None


def allowed_hosts(settings: Settings) -> set[str]:
    """Registry hosts names may name: Ollama's library and MINIVAULT_PULL_REGISTRIES (`https://` and `/` dropped)."""
    listed = {entry.rpartition("://")[2].strip("/").lower() for entry in settings.pull_registry_list()}
    return {LIBRARY_HOST} | listed


def check_name(settings: Settings, name: str) -> None:
    """Raise RegistryNotAllowed when `name` names a registry host that is not allowed."""
    host = registry_host(name)
    if host is not None and host not in allowed_hosts(settings):
        raise RegistryNotAllowed(
            f"'{name}' names the registry host '{host}', and Ollama would fetch it from (or send it to) that host; "
            f"use a name from Ollama's library (no host), or add {host} to MINIVAULT_PULL_REGISTRIES"
        )


def require_admin(request: Request) -> None:
    """Raise Forbidden unless the caller holds an admin key (or auth is off)."""
    if not is_admin(request):
        raise Forbidden(
            f"{request.method} {request.url.path} manages the models every key uses, so it needs an admin key "
            "(MINIVAULT_ADMIN_KEYS); this key is an ordinary one (MINIVAULT_API_KEYS)"
        )


def _fields(body: dict[str, Any], *names: str) -> Iterator[Any]:
    # Ollama decodes bodies with Go's encoding/json, which matches keys to fields ignoring case ("MODEL",
    # even "ſource" is `source`): every key that folds to the field is looked at, not just the exact one.
    for key, value in body.items():
        if key.casefold() in names:
            yield value


def _names(body: dict[str, Any], *fields: str) -> Iterator[str]:
    # A value that is not a string fails Ollama's own decoding, so it never reaches a registry.
    return (value for value in _fields(body, *fields) if isinstance(value, str))


def _check_insecure(settings: Settings, body: dict[str, Any]) -> None:
    if settings.allow_insecure_registries:
        return
    if any(value is not None and value is not False for value in _fields(body, "insecure")):
        raise RegistryNotAllowed(
            "`insecure: true` talks to the registry without checking its TLS certificate (or over plain HTTP), so "
            "anyone on the network path can swap the model; it is refused unless MINIVAULT_ALLOW_INSECURE_REGISTRIES"
            "=true"
        )


def _pull(settings: Settings, body: dict[str, Any]) -> None:
    _check_insecure(settings, body)
    for name in _names(body, "model", "name"):
        check_name(settings, name)


def _push(settings: Settings, body: dict[str, Any]) -> None:
    if not settings.allow_push:
        raise PushNotAllowed(
            "POST /api/push uploads a model's files from this machine to a registry (what was fine-tuned or built "
            "here leaves it); it is refused unless MINIVAULT_ALLOW_PUSH=true"
        )
    _pull(settings, body)


def _copy(settings: Settings, body: dict[str, Any]) -> None:
    # A copy named for a foreign registry is one push away from being sent there.
    for name in _names(body, "destination"):
        check_name(settings, name)


def _create(settings: Settings, body: dict[str, Any]) -> None:
    names = list(_names(body, "model", "name", "from"))
    for modelfile in _names(body, "modelfile"):
        names += _MODELFILE_FROM.findall(modelfile)
    for name in names:
        check_name(settings, name)


# The Ollama routes whose bodies name models Ollama would fetch, send or name after a registry.
_BODY_RULES: dict[str, Callable[[Settings, dict[str, Any]], None]] = {
    "/api/pull": _pull,
    "/api/push": _push,
    "/api/copy": _copy,
    "/api/create": _create,
}
# Ollama's model-management routes (under /api): those whose bodies name models, and deleting one.
NAMING_PATHS = frozenset(path.removeprefix("/api") for path in _BODY_RULES)
MANAGEMENT_PATHS = NAMING_PATHS | {"/delete"}


async def check_management(request: Request) -> None:
    """The gate of every model-management route: an admin key, then the registry rules for the body's names.

    The body is read once (Starlette keeps it for the route) and parsed whole; it is within
    MINIVAULT_MAX_BODY_BYTES already. One MiniVault cannot read, Ollama must not read either.
    """
    require_admin(request)
    rule = _BODY_RULES.get(request.url.path)
    if rule is None:
        return
    raw = await request.body()
    reject_non_finite(raw)  # orjson refuses them too, but this error names the field
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"{request.url.path}: the body must be one JSON object (MiniVault checks the model names in it before "
            'passing it to Ollama), like {"model": "llama3"}'
        )
    rule(request.app.state.settings, body)


# For `dependencies=[...]`: the check runs before the route reads or forwards anything.
ModelManagement = Depends(check_management)
