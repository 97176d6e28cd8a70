"""GET /health (liveness) and GET /ready (the upstream is usable)."""

from typing import Any

from fastapi import APIRouter, Request

from app import __version__
from app.backends import Backend, BackendStatus, HostPool
from app.bootstrap import ModelBootstrap
from app.deps import BackendDep, LogDep, ProbeDep
from app.interactions import JsonlWriter
from app.responses import OrjsonResponse

router = APIRouter()


def _body(status: str, backend: Backend, probe: BackendStatus, log: JsonlWriter) -> dict[str, Any]:
    return {
        "status": status,
        "version": __version__,
        "backend": {
            "name": backend.name,
            "url": backend.url,
            "model": backend.default_model,
            "reachable": probe.reachable,
            "model_available": probe.model_available,
        },
        "log": log.state,
        **({"hosts": backend.hosts_status()} if isinstance(backend, HostPool) else {}),
    }


_HEALTH_EXAMPLE = {
    "status": "ok", "version": "0.2.0",
    "backend": {"name": "ollama", "url": "http://localhost:11434", "model": "tinyllama:1.1b-chat", "reachable": True,
                "model_available": True},
    "log": "ok",
}  # fmt: skip


def _example(body: dict[str, object]) -> dict[int | str, dict[str, object]]:
    return {200: {"description": "Successful Response", "content": {"application/json": {"example": body}}}}


@router.get("/health", responses=_example(_HEALTH_EXAMPLE))
async def health(backend: BackendDep, probe: ProbeDep, log: LogDep) -> OrjsonResponse:
    """The process is up; also reports the upstream and the interaction log."""
    return OrjsonResponse(_body("ok", backend, await probe.status(), log))


_READY_503 = (
    "The upstream is down, lacks the model, or is loading it; with MINIVAULT_AUTO_PULL, `reason` is `pulling` "
    "(with `completed` and `total` bytes) while the default model is pulled, `pull_failed` (with `message`) "
    "while a failed pull waits for its retry."
)


@router.get("/ready", responses={**_example({**_HEALTH_EXAMPLE, "status": "ready"}), 503: {"description": _READY_503}})
async def ready(request: Request, backend: BackendDep, probe: ProbeDep, log: LogDep) -> OrjsonResponse:
    """200 when the upstream answers and has the configured model, else 503 with the reason."""
    status = await probe.status()
    bootstrap: ModelBootstrap | None = getattr(request.app.state, "bootstrap", None)
    if bootstrap is not None and (pending := bootstrap.readiness()) is not None:
        body = _body(pending.pop("status"), backend, status, log)
        body.update(pending)
        return OrjsonResponse(body, status_code=503)
    warm_up = request.app.state.loading
    if warm_up is not None and not warm_up.done():
        body = _body("loading", backend, status, log)
        body["reason"] = "loading"
        body["message"] = f"loading {backend.default_model} upstream (MINIVAULT_WARMUP)"
        return OrjsonResponse(body, status_code=503)
    if status.reachable and status.model_available:
        return OrjsonResponse(_body("ready", backend, status, log))
    body = _body("unavailable", backend, status, log)
    body["reason"] = status.reason
    return OrjsonResponse(body, status_code=503)
