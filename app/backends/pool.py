"""Several upstream hosts of one kind (Ollama, or OpenAI-compatible servers) behind one Backend.

A background task keeps, per host: whether it answers, the models it has, which are loaded, and
what is in flight. Each generation goes to a healthy host that has its model, preferring one where
the model is loaded, then the least busy (`MINIVAULT_ROUTING=random` and `round_robin` exist to be
measured against). A host that fails to connect or answers an error before the first token is
cooled down for `MINIVAULT_HOST_COOLDOWN_SECONDS` and the prompt goes to the next host; once a
token has been sent, nothing is retried. Core and routes never learn how many hosts there are.
"""

import asyncio
import itertools
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from app.backends.base import BackendStatus, ChatInput, Completion, ModelInfo
from app.backends.ollama import model_in
from app.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Busy,
    MiniVaultError,
    ModelNotFound,
    NotSupported,
)
from app.vocabulary import Event

logger = logging.getLogger(__name__)

Routing = Literal["least_busy", "random", "round_robin"]
# Failures before the first token that say "this host, not this prompt": another host may well answer.
_HOST_FAILURES = (BackendUnavailable, BackendTimeout, BackendError, Busy)


class HostBackend(Protocol):
    """What the pool needs of one host's backend (OllamaBackend and OpenAICompatBackend have it)."""

    name: str
    url: str
    default_model: str

    def stream(self, chat: ChatInput, completion: Completion) -> AsyncIterator[Event]: ...

    async def list_models(self) -> list[ModelInfo]: ...

    async def capabilities(self, model: str) -> frozenset[str]: ...

    async def inventory(self, seconds: float) -> tuple[list[ModelInfo], set[str]]:
        """The models the host has and those loaded now; raises MiniVaultError when it does not answer."""
        ...

    async def warm(self, model: str) -> None: ...


class PoolObserver(Protocol):
    """Told of each host's traffic (the per-host metrics series)."""

    def host_request(self, host: str, outcome: str) -> None: ...

    def host_in_flight(self, host: str, count: int) -> None: ...

    def host_cooldown(self, host: str) -> None: ...


@dataclass(slots=True)
class Host:
    """One upstream and what the pool knows of it."""

    backend: HostBackend
    # What /health and /ready call it: its place in the configured list, never its URL.
    label: str = ""
    healthy: bool = False
    checked: bool = False
    reason: str | None = "not checked yet"
    models: list[ModelInfo] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    loaded: set[str] = field(default_factory=set)
    in_flight: int = 0
    cooldown_until: float = 0.0

    @property
    def url(self) -> str:
        return self.backend.url

    def has(self, model: str) -> bool:
        return model_in(model, self.names)  # type: ignore[arg-type]

    def usable(self, now: float) -> bool:
        return self.healthy and now >= self.cooldown_until

    def state(self, now: float) -> str:
        if not self.checked:
            return "unknown"
        if not self.healthy:
            return "down"
        return "cooling" if now < self.cooldown_until else "ok"


def _why(host: Host, now: float) -> str:
    if now < host.cooldown_until:
        return f"cooling down for {host.cooldown_until - now:.0f} s after: {host.reason}"
    return host.reason or "failed"


class HostPool:
    """A Backend that routes each generation to one of several hosts."""

    def __init__(
        self,
        hosts: list[HostBackend],
        *,
        default_model: str,
        limit: int,
        routing: Routing = "least_busy",
        check_seconds: float = 5.0,
        cooldown_seconds: float = 10.0,
        observer: PoolObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hosts = [Host(backend, f"host-{number}") for number, backend in enumerate(hosts, 1)]
        self.name = hosts[0].name
        self.url = ",".join(host.url for host in self.hosts)
        self.default_model = default_model
        # Each host's share of MINIVAULT_MAX_CONCURRENCY: the busy measure is in-flight per share.
        self._share = max(limit / len(self.hosts), 1.0)
        self._routing = routing
        self._check_seconds = check_seconds
        self._cooldown_seconds = cooldown_seconds
        self._observer = observer
        self._clock = clock
        self._turn = itertools.count()
        self._task: asyncio.Task[None] | None = None

    # --- keeping track of the hosts -------------------------------------------------------------

    async def start(self) -> None:
        """Check every host once, then keep checking in the background."""
        await self.check_all()
        self._task = asyncio.create_task(self._keep_checking())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _keep_checking(self) -> None:
        while True:
            await asyncio.sleep(self._check_seconds)
            try:
                await self.check_all()
            except Exception:  # one bad round must not end the checks for good
                logger.exception("checking the upstream hosts failed")

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(host) for host in self.hosts))

    async def _check(self, host: Host) -> None:
        try:
            models, loaded = await host.backend.inventory(min(self._check_seconds, 5.0))
        except MiniVaultError as exc:
            if host.healthy or not host.checked:
                logger.warning("upstream host %s is down: %s", host.url, exc.message)
            host.healthy, host.checked, host.reason = False, True, exc.message
            return
        if not host.healthy and host.checked:
            logger.info("upstream host %s is back: %d models", host.url, len(models))
        host.healthy, host.checked, host.reason = True, True, None
        host.models, host.names, host.loaded = models, {m.name for m in models}, loaded

    def _cool(self, host: Host, error: MiniVaultError, started: bool) -> None:
        host.cooldown_until = self._clock() + self._cooldown_seconds
        host.reason = error.message
        when = "mid-answer" if started else "before the first token"
        logger.warning("upstream host %s failed %s, cooling down %g s: %s",
                       host.url, when, self._cooldown_seconds, error.message)  # fmt: skip
        if self._observer is not None:
            self._observer.host_cooldown(host.url)

    # --- routing --------------------------------------------------------------------------------

    def pick(self, model: str, tried: list[Host]) -> Host:
        """The host for the next attempt at `model`; raises when no host can take it."""
        now = self._clock()
        candidates = [host for host in self.hosts if host not in tried and host.usable(now) and host.has(model)]
        if not candidates:
            raise self._nobody(model, tried, now)
        if self._routing == "random":
            return random.choice(candidates)
        if self._routing == "round_robin":
            return candidates[next(self._turn) % len(candidates)]
        # A host with the model loaded is preferred while it is under its share (no load wait); past
        # that, or among equals, the fewest in flight for the share wins, so load follows capacity and a
        # model loaded on one host still spreads to the others. Ties take turns.
        turn = next(self._turn)
        share = self._share
        return min(
            candidates,
            key=lambda h: (not (h.in_flight < share and model_in(model, h.loaded)), h.in_flight / share,  # type: ignore[arg-type]
                           (self.hosts.index(h) - turn) % len(self.hosts)),
        )  # fmt: skip

    def _nobody(self, model: str, tried: list[Host], now: float) -> MiniVaultError:
        """Why no host can take `model`: 404 when no host has it, 503 naming the hosts that have it and why."""
        healthy = [host for host in self.hosts if host.healthy]
        if not healthy:
            where = ", ".join(f"{h.url} ({h.reason or 'down'})" for h in self.hosts)
            return BackendUnavailable(f"no upstream host is healthy: {where}")
        holders = [host for host in healthy if host.has(model) or host in tried]
        if holders:
            where = ", ".join(f"{h.url} ({_why(h, now)})" for h in holders)
            return BackendUnavailable(f"every upstream host that has '{model}' failed or is cooling down: {where}")
        fleet = sorted({name for host in healthy for name in host.names})
        return ModelNotFound(
            f"model '{model}' is on no healthy upstream host (the fleet has: {', '.join(fleet) or 'none'}); "
            f"pull it on a host, e.g. `ollama pull {model}`"
        )

    async def stream(self, chat: ChatInput, completion: Completion) -> AsyncGenerator[Event, None]:
        """Yield the answer from the chosen host; before the first token, a failing host hands over to the next."""
        tried: list[Host] = []
        missing: ModelNotFound | None = None
        while True:
            try:
                host = self.pick(chat.model, tried)
            except MiniVaultError:
                if missing is not None and not any(h.has(chat.model) for h in self.hosts):
                    raise missing from None  # the hosts said 404 themselves: their message says what they have
                raise
            tried.append(host)
            completion.host = host.url
            host.in_flight += 1
            self._report_in_flight(host)
            started = False
            outcome = "ok"
            try:
                async with aclosing(host.backend.stream(chat, completion)) as chunks:  # type: ignore[type-var]
                    async for text in chunks:
                        started = True
                        yield text
                host.loaded.add(chat.model)
                return
            except ModelNotFound as exc:
                if started:
                    raise
                # The host lost the model since its last check: forget it there and try another.
                host.names.discard(chat.model)
                host.names.discard(f"{chat.model}:latest")
                outcome, missing = "model_not_found", exc
            except _HOST_FAILURES as exc:
                outcome = "failed"
                self._cool(host, exc, started)
                if started:
                    raise
            except MiniVaultError:
                outcome = "rejected"  # the prompt's fault (an upstream 400), not the host's
                raise
            except BaseException:
                outcome = "cancelled"
                raise
            finally:
                host.in_flight -= 1
                self._report_in_flight(host)
                if self._observer is not None:
                    self._observer.host_request(host.url, outcome)

    def _report_in_flight(self, host: Host) -> None:
        if self._observer is not None:
            self._observer.host_in_flight(host.url, host.in_flight)

    # --- the rest of the Backend interface ------------------------------------------------------

    async def list_models(self) -> list[ModelInfo]:
        """Every model some healthy host has, once, with the hosts that have it in `details.hosts`."""
        merged: dict[str, ModelInfo] = {}
        for host in self.hosts:
            if not host.healthy:
                continue
            for info in host.models:
                if info.name not in merged:
                    merged[info.name] = ModelInfo(info.name, info.size, info.modified_at, {**info.details, "hosts": []})
                merged[info.name].details["hosts"].append(host.url)
        if not merged and not any(host.healthy for host in self.hosts):
            raise self._nobody(self.default_model, [], self._clock())
        return list(merged.values())

    async def capabilities(self, model: str) -> frozenset[str]:
        """What some healthy host that has `model` can do with it (the union: a request goes to one that can)."""
        found: set[str] = set()
        for host in self.hosts:
            if host.healthy and host.has(model):
                found |= await host.backend.capabilities(model)
        return frozenset(found)

    async def warm(self, model: str) -> None:
        await self.pick(model, []).backend.warm(model)

    async def probe(self, seconds: float) -> BackendStatus:
        """From the background checks: reachable when some host answers, ready when one has the default model."""
        healthy = [host for host in self.hosts if host.healthy]
        if not healthy:
            reasons = "; ".join(f"{h.url}: {h.reason}" for h in self.hosts)
            return BackendStatus(False, False, f"no upstream host answers ({reasons})")
        if any(host.has(self.default_model) for host in healthy):
            return BackendStatus(True, True)
        return BackendStatus(True, False, f"no healthy host has model '{self.default_model}'")

    def hosts_status(self) -> list[dict[str, Any]]:
        """Each host as /health and /ready show it: by its label; `reason` may still name its (redacted) URL,
        which the open routes replace through `app.routes.health.public_text`."""
        now = self._clock()
        return [
            {
                "host": host.label,
                "state": host.state(now),
                "models": sorted(host.names),
                "loaded": sorted(host.loaded),
                "in_flight": host.in_flight,
                "reason": host.reason if host.state(now) != "ok" else None,
            }  # fmt: skip
            for host in self.hosts
        ]

    def host_labels(self) -> list[tuple[str, str]]:
        """Each host's URL (password redacted) and its label, in the configured order."""
        return [(host.url, host.label) for host in self.hosts]

    async def pull(self, model: str) -> AsyncGenerator[dict[str, Any], None]:
        """Pull `model` on every healthy host in turn; each event names its host."""
        hosts = [host for host in self.hosts if host.healthy]
        if not hosts:
            raise self._nobody(model, [], self._clock())
        for host in hosts:
            pull = getattr(host.backend, "pull", None)
            if pull is None:
                raise NotSupported(f"the {self.name} hosts cannot pull models")
            async for event in pull(model):
                if event.get("status") == "success" and host is not hosts[-1]:
                    event = {**event, "status": f"success on {host.url}"}  # only the last host's ends the pull
                yield {**event, "host": host.url}
            await self._check(host)
