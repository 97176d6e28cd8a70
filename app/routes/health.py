"""GET /health (liveness) and GET /ready (the upstream is usable)."""

import functools
from typing import Any

import httpx
from fastapi import APIRouter, Request

from app import __version__
from app.backends import Backend, BackendStatus, HostPool
from app.config import redact_url
from app.core.autopull import ModelBootstrap
from app.exchanges import JsonlWriter
from app.web.deps import BackendDep, LogDep, ProbeDep
from app.web.responses import OrjsonResponse

router = APIRouter()


# /health and /ready are open to anyone, so they name the upstream by the setting that locates it,
# never by its URL (the embedded engine's is its private loopback port).
_URL_LABELS = {"ollama": "OLLAMA_BASE_URL", "openai": "OPENAI_BASE_URL", "embedded": "its loopback port"}


@functools.lru_cache(maxsize=8)  # the backend's URLs never change; /health is polled every few seconds
def _labels(backend: Backend) -> tuple[tuple[str, str], ...]:
    """Each upstream URL and what open endpoints call it instead, with its bare `host:port` too."""
    pairs = backend.host_labels() if isinstance(backend, HostPool) else [
        (backend.url, _URL_LABELS.get(backend.name, "its URL"))
    ]  # fmt: skip
    # Transport errors name the bare `host:port` ("Cannot connect to host 127.0.0.1:11434"); a name
    # without a port is too likely to be an ordinary word to replace.
    netlocs = [(netloc, label) for url, label in pairs if ":" in (netloc := httpx.URL(url).netloc.decode())]
    found = [(url, label) for url, label in pairs + netlocs if url]
    return tuple(sorted(found, key=lambda pair: len(pair[0]), reverse=True))  # a longer one may contain a shorter


def public_text(text: str | None, backend: Backend) -> str | None:
    """`text` fit for an unauthenticated caller: upstream URLs replaced by labels, any password redacted."""
    if text is None:
        return None
    for url, label in _labels(backend):  # type: ignore[arg-type]  # backends hash by identity
        text = text.replace(url, label)
    return redact_url(text)


def _body(status: str, backend: Backend, probe: BackendStatus, log: JsonlWriter) -> dict[str, Any]:
    body: dict[str, Any] = {
        "status": status,
        "version": __version__,
        "backend": {
            "name": backend.name,
            "model": backend.default_model,
            "reachable": probe.reachable,
            "model_available": probe.model_available,
        },
        "log": log.state,
    }
    if isinstance(backend, HostPool):
        body["hosts"] = [{**host, "reason": public_text(host["reason"], backend)} for host in backend.hosts_status()]
    return body


_HEALTH_EXAMPLE: dict[str, object] = {
    "status": "ok", "version": "0.2.0",
    "backend": {"name": "ollama", "model": "tinyllama:1.1b-chat", "reachable": True, "model_available": True},
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
        if isinstance(body.get("message"), str):
            body["message"] = public_text(body["message"], backend)  # a failed pull's error names the upstream
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
    body["reason"] = public_text(status.reason, backend)
    return OrjsonResponse(body, status_code=503)
