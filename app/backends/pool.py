"""Several upstream hosts of one kind (Ollama, or OpenAI-compatible servers) behind one Backend.

A background task keeps, per host: whether it answers, the models it has, which are loaded, and
what is in flight. Each generation goes to a healthy host that has its model, preferring one where
the model is loaded, then the least busy (`MINIVAULT_ROUTING=random` and `round_robin` exist to be
measured against). A host that fails to connect or answers an error before the first token is
cooled down for `MINIVAULT_HOST_COOLDOWN_SECONDS` and the prompt goes to the next host; once a
token has been sent, nothing is retried. Core and routes never learn how many hosts there are.

A prompt that needs more than text (tools, images, thinking, a suffix) goes only to hosts whose model
has those capabilities; each host's answer is kept per model and asked again with its inventory checks.
"""

import asyncio
import itertools
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

from app.backends.base import (
    BackendStatus,
    ChatInput,
    Completion,
    ModelInfo,
    SupportsForward,
    check_capabilities,
    required_capabilities,
)
from app.backends.ollama import OllamaBackend, model_in
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
    # What each model asked about can do here (its backend's capabilities), and the questions under way.
    capabilities: dict[str, frozenset[str]] = field(default_factory=dict)
    asking: dict[str, "asyncio.Future[frozenset[str]]"] = field(default_factory=dict)

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
            host.capabilities.clear()  # it may come back with other models under the same names
            return
        if not host.healthy and host.checked:
            logger.info("upstream host %s is back: %d models", host.url, len(models))
        host.healthy, host.checked, host.reason = True, True, None
        host.models, host.names, host.loaded = models, {m.name for m in models}, loaded
        await self._refresh_capabilities(host)

    async def _refresh_capabilities(self, host: Host) -> None:
        """Ask again what the models asked about can do (a model re-pulled may have changed); forget the gone."""
        known = [model for model in host.capabilities if host.has(model)]
        host.capabilities = {}
        await asyncio.gather(*(self._capabilities_of(host, model) for model in known), return_exceptions=True)

    def _cool(self, host: Host, error: MiniVaultError, started: bool) -> None:
        host.cooldown_until = self._clock() + self._cooldown_seconds
        host.reason = error.message
        when = "mid-answer" if started else "before the first token"
        logger.warning("upstream host %s failed %s, cooling down %g s: %s",
                       host.url, when, self._cooldown_seconds, error.message)  # fmt: skip
        if self._observer is not None:
            self._observer.host_cooldown(host.url)

    # --- routing --------------------------------------------------------------------------------

    def pick(self, model: str, tried: list[Host], able: list[Host] | None = None) -> Host:
        """The host for the next attempt at `model` (among `able`, when the prompt needs capabilities)."""
        now = self._clock()
        candidates = [host for host in self.hosts if host not in tried and host.usable(now) and host.has(model)]
        if able is not None:
            candidates = [host for host in candidates if host in able]
        if not candidates:
            raise self._nobody(model, tried, now, able)
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

    def _nobody(self, model: str, tried: list[Host], now: float, able: list[Host] | None = None) -> MiniVaultError:
        """Why no host can take `model`: 404 when no host has it, 503 naming the hosts that have it and why."""
        healthy = [host for host in self.hosts if host.healthy]
        if not healthy:
            where = ", ".join(f"{h.url} ({h.reason or 'down'})" for h in self.hosts)
            return BackendUnavailable(f"no upstream host is healthy: {where}")
        holders = [host for host in healthy if host.has(model) or host in tried]
        if able is not None:
            holders = [host for host in holders if host in able]
        if holders:
            where = ", ".join(f"{h.url} ({_why(h, now)})" for h in holders)
            which = "that has" if able is None else "able to answer this prompt with"
            return BackendUnavailable(f"every upstream host {which} '{model}' failed or is cooling down: {where}")
        fleet = sorted({name for host in healthy for name in host.names})
        return ModelNotFound(
            f"model '{model}' is on no healthy upstream host (the fleet has: {', '.join(fleet) or 'none'}); "
            f"pull it on a host, e.g. `ollama pull {model}`"
        )

    async def stream(self, chat: ChatInput, completion: Completion) -> AsyncGenerator[Event, None]:
        """Yield the answer from the chosen host; before the first token, a failing host hands over to the next."""
        tried: list[Host] = []
        missing: ModelNotFound | None = None
        # Plain text asks nothing of a host beyond the model: no capability is looked up.
        able = None if chat.plain else await self._able(chat)
        while True:
            try:
                host = self.pick(chat.model, tried, able)
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

    async def _able(self, chat: ChatInput) -> list[Host] | None:
        """The healthy hosts whose model has what `chat` needs (None: it needs nothing); a 400 naming what is
        missing when no host's has it, or a 503 when the hosts that might could not say."""
        needs = required_capabilities(chat)
        if not needs:
            return None
        model = chat.model
        holders = [host for host in self.hosts if host.healthy and host.has(model)]
        if not holders:
            return None  # pick() says why: no host has the model, or none is healthy
        answers = await asyncio.gather(*(self._capabilities_of(host, model) for host in holders),
                                       return_exceptions=True)  # fmt: skip
        able: list[Host] = []
        fewest_missing: frozenset[str] | None = None
        unknown: list[str] = []
        for host, answer in zip(holders, answers, strict=True):
            if isinstance(answer, MiniVaultError):
                unknown.append(f"{host.url} ({answer.message})")
            elif isinstance(answer, BaseException):
                raise answer
            elif needs <= answer:
                able.append(host)
            elif fewest_missing is None or len(needs - answer) < len(needs - fewest_missing):
                fewest_missing = answer
        if able:
            return able
        if unknown:
            raise BackendUnavailable(
                f"no upstream host whose '{model}' could be asked says it can answer this prompt; asking failed on "
                f"{', '.join(unknown)}"
            )
        assert fewest_missing is not None
        check_capabilities(chat, fewest_missing)  # raises, naming what the best-equipped host lacks
        raise AssertionError("unreachable: no host is able, so some capability is missing")

    async def _capabilities_of(self, host: Host, model: str) -> frozenset[str]:
        """What `model` can do on `host`: kept from an earlier answer, else asked once however many prompts wait."""
        known = host.capabilities.get(model)
        if known is not None:
            return known
        pending = host.asking.get(model)
        if pending is None:
            pending = asyncio.ensure_future(self._ask(host, model))
            host.asking[model] = pending
            pending.add_done_callback(lambda _: host.asking.pop(model, None))
        # Shielded: a prompt cancelled while it waits must not cancel the question the others wait on.
        return await asyncio.shield(pending)

    async def _ask(self, host: Host, model: str) -> frozenset[str]:
        seconds = min(self._check_seconds, 5.0)
        try:
            answer = await asyncio.wait_for(host.backend.capabilities(model), seconds)
        except TimeoutError:
            raise BackendTimeout(f"{host.url} did not say within {seconds:g} s what '{model}' can do") from None
        except MiniVaultError as exc:
            logger.warning("upstream host %s could not say what %s can do: %s", host.url, model, exc.message)
            raise
        host.capabilities[model] = answer
        return answer

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
        """What some healthy host that has `model` can do with it (the union: a request goes to one that can).

        A host that cannot say is left out; when none can, its error is raised.
        """
        holders = [host for host in self.hosts if host.healthy and host.has(model)]
        answers = await asyncio.gather(*(self._capabilities_of(host, model) for host in holders),
                                       return_exceptions=True)  # fmt: skip
        found: set[str] = set()
        errors: list[MiniVaultError] = []
        for answer in answers:
            if isinstance(answer, MiniVaultError):
                errors.append(answer)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                found |= answer
        if errors and len(errors) == len(answers):
            raise errors[0]
        return frozenset(found)

    async def running(self) -> list[dict[str, Any]] | None:
        """The models the Ollama hosts have loaded, as their own `/api/ps` lists them (once per model: the first
        host's entry); None when the hosts have no `/api/ps` (OpenAI-compatible servers load what they serve)."""
        hosts = [host for host in self.hosts if host.healthy and isinstance(host.backend, SupportsForward)]
        if not hosts:
            return None
        answers = await asyncio.gather(*(self._ps(host) for host in hosts), return_exceptions=True)
        merged: dict[str, dict[str, Any]] = {}
        for host, answer in zip(hosts, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, MiniVaultError | ValueError):
                    raise answer
                logger.warning("upstream host %s did not list its loaded models: %s", host.url, answer)
                continue
            for entry in answer:
                merged.setdefault(str(entry.get("name") or entry.get("model")), entry)
        return list(merged.values())

    async def _ps(self, host: Host) -> list[dict[str, Any]]:
        backend = host.backend
        assert isinstance(backend, SupportsForward)
        response = await backend.forward("GET", "/api/ps", b"")
        try:
            await response.aread()
            if response.status_code != 200:
                raise BackendError(f"{host.url} answered {response.status_code} to /api/ps")
            models = response.json().get("models")
        finally:
            await response.aclose()
        return [entry for entry in models if isinstance(entry, dict)] if isinstance(models, list) else []

    async def warm(self, model: str, keep_alive: str | int | float | None = None) -> None:
        """Load `model` on the host a request would go to; with a `keep_alive`, pass it to every Ollama host that
        has the model (so `0` unloads it everywhere, as Open WebUI's Unload means)."""
        if keep_alive is None:
            await self.pick(model, []).backend.warm(model)
            return
        ollamas = [h for h in self.hosts if h.healthy and h.has(model) and isinstance(h.backend, OllamaBackend)]
        if not ollamas:
            await self.pick(model, []).backend.warm(model)
            return
        await asyncio.gather(*(cast(OllamaBackend, host.backend).warm(model, keep_alive) for host in ollamas))

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
