"""GET /models (what the upstream has) and POST /models/pull (download one, progress as SSE)."""

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.backends import SupportsPull
from app.deps import BackendDep
from app.errors import NotSupported
from app.request_id import request_id_of
from app.responses import OrjsonResponse, open_event_stream, sse_event
from app.schemas import ErrorBody, PullRequest, parse_body

router = APIRouter()


@router.get("/models")
async def models(backend: BackendDep) -> OrjsonResponse:
    """The models the upstream has, with their sizes in bytes."""
    found = await backend.list_models()
    return OrjsonResponse(
        {
            "default": backend.default_model,
            "models": [
                {"name": m.name, "size": m.size, "modified_at": m.modified_at, "details": m.details} for m in found
            ],
        }
    )


@router.post(
    "/models/pull",
    responses={
        200: {"description": "`progress` events, then `done` or `error`.", "content": {"text/event-stream": {}}},
        404: {"model": ErrorBody},
        501: {"model": ErrorBody, "description": "The backend in use cannot pull models."},
    },
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": PullRequest.model_json_schema()}}}
    },
)
async def pull(request: Request, backend: BackendDep) -> Response:
    """Download a model into Ollama, streaming its progress as Server-Sent Events."""
    body = parse_body(PullRequest, await request.body(), '{"model": "tinyllama:1.1b-chat"}')
    if not isinstance(backend, SupportsPull):
        raise NotSupported(
            f"the {backend.name} backend cannot pull models; pulling works with Ollama (MINIVAULT_BACKEND=ollama)"
        )
    return await open_event_stream(request.receive, backend.pull(body.model), _event, request_id_of(request))


def _event(event: dict[str, Any]) -> bytes:
    return sse_event(b"done" if event.get("status") == "success" else b"progress", event)
