"""MINIVAULT_AUTO_PULL: at start-up, pull the default model into Ollama when it is missing.

A background task checks Ollama, pulls the model if it lacks it, then (with MINIVAULT_WARMUP)
loads it. Meanwhile /ready says `pulling` with the bytes so far, and new prompts get
`503 model_loading` through a LoadingGate in `GenerationService.gates`. A failed pull is logged, shown by
/ready as `pull_failed`, and tried again with backoff until it succeeds; an Ollama that does not
answer yet is checked again on the same schedule.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any, Literal

from app.backends import Backend, SupportsPull
from app.config import Settings
from app.core.gates import LoadingGate
from app.core.service import GenerationService
from app.errors import MiniVaultError, ModelLoading

logger = logging.getLogger(__name__)

# Seconds before the first retry; each next one waits twice as long, up to RETRY_CAP.
RETRY_BASE = 5.0
RETRY_CAP = 300.0

Phase = Literal["checking", "pulling", "failed", "warming", "done"]


class ModelBootstrap:
    """Makes sure Ollama has the default model; `refusal` and `readiness` tell the rest of the app how far it is.

    Phases: `checking` (asking Ollama, or waiting for it to answer), `pulling`, `failed` (waiting
    to retry; a retry shows `pulling` again only once its first layer reports bytes, so a registry
    that keeps refusing does not make prompts flicker between errors), `warming`, `done`.
    """

    def __init__(
        self,
        backend: Backend,
        probe_timeout: float,
        *,
        retry_base: float = RETRY_BASE,
        retry_cap: float = RETRY_CAP,
        after: Callable[[], Awaitable[None]] | None = None,
        on_pulled: Callable[[], None] | None = None,
    ) -> None:
        assert isinstance(backend, SupportsPull)
        self.backend = backend
        self.model = backend.default_model
        self.probe_timeout = probe_timeout
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.after = after
        self.on_pulled = on_pulled
        self.phase: Phase = "checking"
        self.error: str | None = None
        self.pulls = 0
        self._layers: dict[str, tuple[int, int]] = {}
        self._status: str | None = None
        self._logged: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def completed(self) -> int:
        """Bytes downloaded so far, over every layer Ollama has reported."""
        return sum(completed for completed, _ in self._layers.values())

    @property
    def total(self) -> int:
        """Bytes of every layer Ollama has reported so far."""
        return sum(total for _, total in self._layers.values())

    def progress(self) -> str:
        """`pulling NAME: 45% of 637 MB`, or Ollama's own status before any layer reports its size."""
        total = self.total
        if total:
            return f"pulling {self.model}: {self.completed * 100 // total}% of {_size(total)}"
        return f"pulling {self.model} ({self._status or 'starting'})"

    def refusal(self, model: str) -> MiniVaultError | None:
        """What a prompt for `model` gets while that model is being pulled (the service's `unavailable` hook)."""
        if self.phase != "pulling" or model != self.model:
            return None
        return ModelLoading(f"{self.progress()}; retry when /ready says ready")

    def readiness(self) -> dict[str, Any] | None:
        """The `status`, `reason` and details /ready answers 503 with, or None when the usual checks apply."""
        if self.phase == "pulling":
            return {
                "status": "pulling",
                "reason": "pulling",
                "completed": self.completed,
                "total": self.total,
                "message": f"{self.progress()} (MINIVAULT_AUTO_PULL)",
            }
        if self.phase == "failed":
            return {"status": "unavailable", "reason": "pull_failed", "message": self.error}
        if self.phase == "warming":
            return {"status": "loading", "reason": "loading",
                    "message": f"loading {self.model} upstream (MINIVAULT_WARMUP)"}  # fmt: skip
        return None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def aclose(self) -> None:
        """Stop whatever is under way (a pull in progress is closed upstream)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def run(self) -> None:
        """Check, pull if need be (retrying with backoff), then warm up; returns once the model is there."""
        retries = 0
        while True:
            status = await self.backend.probe(self.probe_timeout)
            if status.model_available:
                if self.pulls:
                    logger.info("auto-pull: %s is in Ollama now", self.model)
                else:
                    logger.info("auto-pull: %s is already in Ollama; nothing to pull", self.model)
                break
            delay = min(self.retry_base * 2**retries, self.retry_cap)
            retries += 1
            if not status.reachable:
                logger.warning("auto-pull: %s; checking again in %g s", status.reason, delay)
                await asyncio.sleep(delay)
                continue
            try:
                await self._pull()
                break
            except MiniVaultError as exc:
                message = exc.message
            except Exception as exc:
                logger.exception("auto-pull of %s crashed", self.model)
                message = f"{type(exc).__name__}: {exc}"
            self.phase = "failed"
            self.error = f"pulling {self.model} into Ollama failed: {message}; next try in {delay:g} s"
            logger.error("auto-pull: %s", self.error)
            await asyncio.sleep(delay)
        self.error = None
        if self.after is not None:
            self.phase = "warming"
            await self.after()
        self.phase = "done"

    async def _pull(self) -> None:
        self.pulls += 1
        self._layers.clear()
        self._logged.clear()
        self._status = None
        if self.phase != "failed":
            self.phase = "pulling"
        logger.info("auto-pull: %s is not in Ollama; pulling it (try %d)", self.model, self.pulls)
        async with aclosing(self.backend.pull(self.model)) as events:
            async for event in events:
                self._track(event)
        logger.info("auto-pull: %s pulled (%s)", self.model, _size(self.total))
        if self.on_pulled is not None:
            self.on_pulled()

    def _track(self, event: dict[str, Any]) -> None:
        """Record one progress event; log a line per layer each 10% it advances, and each new status."""
        status = event.get("status")
        digest, total, completed = event.get("digest"), event.get("total"), event.get("completed") or 0
        if isinstance(digest, str) and isinstance(total, int) and total > 0 and isinstance(completed, int):
            completed = min(completed, total)
            self._layers[digest] = (completed, total)
            self.phase = "pulling"
            tenth = completed * 10 // total
            if self._logged.get(digest) != tenth:
                self._logged[digest] = tenth
                logger.info("auto-pull: %s layer %s: %d%% of %s", self.model, digest.removeprefix("sha256:")[:12],
                            completed * 100 // total, _size(total))  # fmt: skip
        elif isinstance(status, str) and status not in (self._status, "success"):
            logger.info("auto-pull: %s: %s", self.model, status)
        if isinstance(status, str):
            self._status = status


def start_bootstrap(
    settings: Settings,
    backend: Backend,
    service: GenerationService,
    on_pulled: Callable[[], None] | None = None,
    after: Callable[[], Awaitable[None]] | None = None,
) -> ModelBootstrap | None:
    """Start the auto-pull when MINIVAULT_AUTO_PULL is on and the backend can pull (Ollama); else None."""
    if not settings.auto_pull:
        return None
    if not isinstance(backend, SupportsPull):
        logger.info("MINIVAULT_AUTO_PULL is ignored: the %s backend cannot pull models (only Ollama can)", backend.name)
        return None
    bootstrap = ModelBootstrap(
        backend, settings.health_timeout, retry_base=RETRY_BASE, retry_cap=RETRY_CAP, after=after, on_pulled=on_pulled
    )
    service.gates.insert(1, LoadingGate(bootstrap.refusal))  # after draining, before the rate limit
    bootstrap.start()
    return bootstrap


def _size(size: int) -> str:
    """Bytes as Ollama prints them (decimal units)."""
    if size >= 1_000_000_000:
        return f"{size / 1e9:.1f} GB"
    if size >= 1_000_000:
        return f"{size / 1e6:.0f} MB"
    if size >= 1_000:
        return f"{size / 1e3:.0f} kB"
    return f"{size} B"
