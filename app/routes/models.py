"""GET /models (what the upstream has) and POST /models/pull (download one, progress as SSE)."""

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.backends import SupportsPull
from app.core.model_policy import ModelManagement, check_name
from app.errors import NotSupported
from app.routes.generate import ERRORS
from app.schemas import ErrorBody, PullRequest, parse_body
from app.web.deps import BackendDep
from app.web.request_id import request_id_of
from app.web.responses import OrjsonResponse, open_event_stream, sse_doc, sse_event

router = APIRouter()


_MODELS_EXAMPLE = {
    "default": "tinyllama:1.1b-chat",
    "models": [{"name": "tinyllama:1.1b-chat", "size": 637700138, "modified_at": "2026-11-01T10:00:00Z",
                "details": {"family": "llama", "parameter_size": "1B", "quantization_level": "Q4_0"},
                "capabilities": ["completion", "tools"]}],
}  # fmt: skip


@router.get(
    "/models",
    responses={
        200: {"description": "Successful Response", "content": {"application/json": {"example": _MODELS_EXAMPLE}}},
        **{status: ERRORS[status] for status in (401, 502, 503, 504)},
    },
)
async def models(backend: BackendDep) -> OrjsonResponse:
    """The models the upstream has, with their sizes in bytes and what MiniVault accepts for each (`capabilities`:
    `completion`, `tools`, `vision`, `thinking`, `insert`, `embedding`)."""
    found = await backend.list_models()
    capabilities = await asyncio.gather(*(backend.capabilities(m.name) for m in found))
    return OrjsonResponse(
        {
            "default": backend.default_model,
            "models": [
                {
                    "name": m.name,
                    "size": m.size,
                    "modified_at": m.modified_at,
                    "details": m.details,
                    "capabilities": sorted(can),
                }
                for m, can in zip(found, capabilities, strict=True)
            ],
        }
    )


# Ollama's progress lines as they come: a status and, per layer, its digest and byte counts.
_PROGRESS = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"type": "string"},
        "digest": {"type": "string"},
        "total": {"type": "integer"},
        "completed": {"type": "integer"},
    },
}


@router.post(
    "/models/pull",
    dependencies=[ModelManagement],
    responses={
        **{status: ERRORS[status] for status in (401, 413, 422, 502, 503, 504)},
        200: sse_doc(
            "`progress` events, then `done` or `error`.",
            {"progress": _PROGRESS, "done": _PROGRESS, "error": {"$ref": "#/components/schemas/ErrorBody"}},
        ),
        403: {
            "model": ErrorBody,
            "description": "forbidden: pulling needs an admin key (MINIVAULT_ADMIN_KEYS); registry_not_allowed: the "
            "name names a registry host MINIVAULT_PULL_REGISTRIES does not list",
        },
        404: {"model": ErrorBody, "description": "model_not_found: Ollama's registry has no such model"},
        501: {"model": ErrorBody, "description": "not_supported: the backend in use cannot pull models."},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PullRequest"}}},
        }
    },
)
async def pull(request: Request, backend: BackendDep) -> Response:
    """Download a model into Ollama, streaming its progress as Server-Sent Events (needs an admin key)."""
    body = parse_body(PullRequest, await request.body(), '{"model": "tinyllama:1.1b-chat"}')
    # The very name that will be sent: a host in it is where Ollama would download from.
    check_name(request.app.state.settings, body.model)
    if not isinstance(backend, SupportsPull):
        raise NotSupported(
            f"the {backend.name} backend cannot pull models; pulling works with Ollama (MINIVAULT_BACKEND=ollama)"
        )
    return await open_event_stream(request.receive, backend.pull(body.model), _event, request_id_of(request))


def _event(event: dict[str, Any]) -> bytes:
    return sse_event(b"done" if event.get("status") == "success" else b"progress", event)
