"""The generation service shared by REST, SSE and WebSocket: admission, timeouts, the upstream call,
and handing every finished exchange to its consumers (the JSONL log, metrics)."""

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from app.admission.rate import RateLimiter
from app.admission.slots import AdmissionControl
from app.backends import Backend, ChatInput
from app.core.caller import Caller
from app.core.conversations import ConversationMemory
from app.core.exchange import Exchange
from app.core.gates import DrainGate, Gate, RateGate
from app.errors import BackendTimeout, InvalidRequest, MiniVaultError, RateLimited, ShuttingDown
from app.schemas import (
    ExchangeRecord,
    GenerateRequest,
)
from app.store import Turn
from app.vocabulary import Event, OutputFormat

logger = logging.getLogger(__name__)


class ExchangeConsumer(Protocol):
    """Something that wants every finished exchange (the log file, metrics, later the history)."""

    def consume(self, record: ExchangeRecord) -> None:
        """Take one record; runs on the event loop, so it must not block."""
        ...


@dataclass(frozen=True, slots=True)
class Queued:
    """Yielded by `GenerationService.stream` while the exchange waits: its place in the queue (1 = next)."""

    position: int


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds each phase of an answer may take; `total` None means no overall bound."""

    first_token: float
    idle: float
    total: float | None


class _Guard:
    """Ends one exchange from outside (a timeout, or shutdown) with a MiniVaultError.

    It cancels the exchange's task only while that task waits inside the service (for the
    upstream, or in the queue); while the consumer is busy with a token, it leaves a note that
    the stream raises on its next step. One timer per exchange, re-armed when it fires early and
    once at the first token (the idle bound may be the shorter), so the per-token cost is two
    attribute writes.
    """

    __slots__ = ("loop", "timeouts", "task", "inside", "error", "cancelled", "started", "last", "handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeouts: Timeouts) -> None:
        self.loop = loop
        self.timeouts = timeouts
        self.task: asyncio.Task[Any] | None = None
        self.inside = False
        self.error: MiniVaultError | None = None
        self.cancelled = False
        self.started = 0.0
        self.last: float | None = None
        self.handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """The upstream call begins: from now on the first-token, idle and total bounds apply."""
        self.started = self.loop.time()
        self._schedule()

    def first_token(self) -> None:
        """The first token came: the idle bound may end sooner than the first-token one the timer waits for."""
        if self.handle is not None:
            self.handle.cancel()
        self._schedule()

    def _deadline(self) -> tuple[float, str]:
        timeouts = self.timeouts
        if self.last is None:
            due, which = self.started + timeouts.first_token, "first_token"
        else:
            due, which = self.last + timeouts.idle, "idle"
        if timeouts.total is not None and self.started + timeouts.total < due:
            due, which = self.started + timeouts.total, "total"
        return due, which

    def _schedule(self) -> None:
        due, _ = self._deadline()
        self.handle = self.loop.call_at(due, self._check)

    def _check(self) -> None:
        due, which = self._deadline()
        if self.loop.time() < due:
            self.handle = self.loop.call_at(due, self._check)  # tokens came since: look again later
            return
        self.fire(_timeout_error(which, self.timeouts))

    def fire(self, error: MiniVaultError) -> None:
        """End the exchange with `error`: now if it waits inside the service, else at its next step."""
        if self.error is not None:
            return
        self.error = error
        if self.inside and self.task is not None:
            self.cancelled = True
            self.task.cancel()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


def _timeout_error(which: str, timeouts: Timeouts) -> BackendTimeout:
    if which == "first_token":
        return BackendTimeout(
            f"the upstream sent no token within {timeouts.first_token:g} s (MINIVAULT_FIRST_TOKEN_TIMEOUT="
            f"{timeouts.first_token:g}; a cold model load counts, raise it for large models)"
        )
    if which == "idle":
        return BackendTimeout(
            f"the upstream stopped sending tokens for {timeouts.idle:g} s mid-answer "
            f"(MINIVAULT_IDLE_TIMEOUT={timeouts.idle:g})"
        )
    return BackendTimeout(
        f"the answer took longer than {timeouts.total:g} s in all (MINIVAULT_TOTAL_TIMEOUT={timeouts.total:g})"
    )


class GenerationService:
    """Owns the backend, the admission limiter and the consumers; routes hand it exchanges."""

    def __init__(
        self,
        backend: Backend,
        admission: AdmissionControl,
        timeouts: Timeouts,
        consumers: Sequence[ExchangeConsumer],
        keep_text: bool = True,
        memory: ConversationMemory | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.backend = backend
        self.rate_limiter = rate_limiter
        self._drain_gate = DrainGate()
        # Checked in order before admission; the auto-pull adds its LoadingGate after the drain gate.
        self.gates: list[Gate] = [self._drain_gate]
        if rate_limiter is not None:
            self.gates.append(RateGate(rate_limiter))
        # None when texts may not be stored (MINIVAULT_LOG_PROMPTS=false): no conversations then.
        self.memory = memory
        self.admission = admission
        self.timeouts = timeouts
        self.consumers = list(consumers)
        self.keep_text = keep_text
        self._guards: set[_Guard] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def draining(self) -> bool:
        """Shutting down: new prompts are refused."""
        return self._drain_gate.closed

    @draining.setter
    def draining(self, value: bool) -> None:
        self._drain_gate.closed = value

    def exchange(self, caller: Caller, request: GenerateRequest) -> Exchange:
        """An exchange for MiniVault's own request (REST, SSE, websocket).

        In a conversation `chat` is built once the turns are read; until then it is the prompt alone,
        when the request asks more than text (a format, images, thinking), so the turns can carry it.
        """
        options = request.upstream_options()
        model = request.model or self.backend.default_model
        conversation_id = request.conversation_id
        asks: dict[str, Any] = {}
        if request.format is not None:
            asks["format"] = OutputFormat(None if request.format == "json" else request.format)
        if request.think is not None:
            asks["think"] = request.think
        if request.images:
            asks["images"] = request.decoded_images
        chat = None
        if not conversation_id or asks:
            chat = ChatInput.single(model, request.prompt, request.system, options, **asks)
        return Exchange(
            caller, self.backend, prompt=request.prompt, model=model,
            system=request.system, options=options, chat=chat, conversation_id=conversation_id,
        )  # fmt: skip

    def chat_exchange(self, caller: Caller, chat: ChatInput) -> Exchange:
        """An exchange for messages the client sent whole (the OpenAI and Ollama APIs); no queue events."""
        exchange = Exchange(
            caller, self.backend, prompt=chat.prompt, model=chat.model,
            system=chat.system, options=chat.options, chat=chat,
        )  # fmt: skip
        exchange.announce_queue = False
        return exchange

    async def stream(self, exchange: Exchange) -> AsyncGenerator[Event | Queued, None]:
        """Yield `Queued` while waiting for a slot, then the answer's events (text as `str`); log the exchange once.

        Closing or cancelling the iterator closes the upstream request and logs `cancelled` with
        the partial text. Failures (upstream, timeouts, a full queue, shutdown) are logged and
        raised as MiniVaultError.
        """
        conversation_id = exchange.conversation_id
        held = False
        loop = asyncio.get_running_loop()
        guard = _Guard(loop, self.timeouts)
        self._guards.add(guard)
        self._idle.clear()
        admission = self.admission
        ticket = None
        admitted = False
        parts = exchange.parts
        try:
            guard.task = asyncio.current_task()
            guard.inside = True  # from here on every wait (Redis, the conversation, the queue) can be cut off
            for gate in self.gates:
                await gate.check(exchange)
            if conversation_id is None:
                chat = exchange.chat
                assert chat is not None
            else:
                chat = await self._conversation_input(exchange, guard)
                held = True
            guard.inside = True
            if await admission.try_enter():
                admitted = exchange.accepted = True
            else:
                ticket = await admission.enqueue(exchange.key_id)
                exchange.accepted = True
                shown = 0
                while True:
                    ticket.changed.clear()
                    if ticket.admitted:
                        break
                    position = await admission.position(ticket)
                    if position != shown and exchange.announce_queue:
                        shown = position
                        guard.inside = False
                        yield Queued(position)
                        if guard.error is not None:
                            raise guard.error
                        guard.inside = True
                        continue
                    await ticket.changed.wait()
                ticket, admitted = None, True
            # Measured on the fast path too: a free slot is a wait of about 0 ms, not an unknown one.
            exchange.queue_ms = round((time.perf_counter() - exchange.started) * 1000, 3)
            guard.start()
            guard.inside = True
            first = True
            async with aclosing(self.backend.stream(chat, exchange.completion)) as events:
                async for event in events:
                    guard.inside = False
                    guard.last = loop.time()
                    if first:
                        first = False
                        exchange.ttft_ms = round((time.perf_counter() - exchange.started) * 1000, 3)
                        guard.first_token()
                    if type(event) is str:
                        parts.append(event)
                    else:
                        exchange.absorb(event)  # type: ignore[arg-type]
                    yield event
                    if guard.error is not None:
                        raise guard.error
                    guard.inside = True
            guard.inside = False
            if conversation_id is not None:
                assert self.memory is not None
                assert exchange.prompt is not None
                turn = Turn(exchange.prompt, exchange.text, exchange.id, exchange.iso_ts)
                await self.memory.remember(conversation_id, turn, exchange.system, exchange.key_id)
        except asyncio.CancelledError:
            guard.inside = False
            if guard.cancelled and guard.error is not None:
                # Our own cancellation: take it back, so the task is not left marked as cancelled.
                if guard.task is not None:
                    guard.task.uncancel()
                exchange.status, exchange.error = "error", guard.error
                raise guard.error from None
            exchange.status = "cancelled"
            raise
        except MiniVaultError as exc:
            exchange.status, exchange.error = "error", exc
            raise
        except GeneratorExit:
            exchange.status = "cancelled"
            raise
        finally:
            guard.close()
            self._guards.discard(guard)
            if held:
                assert self.memory is not None and conversation_id is not None
                self.memory.release(conversation_id)
            if ticket is not None:
                await admission.leave(ticket)
                exchange.queue_ms = round((time.perf_counter() - exchange.started) * 1000, 3)
            elif admitted:
                await admission.release(loop.time() - guard.started if guard.started else None)
            self.finish(exchange)
            if not self._guards:
                self._idle.set()

    async def _conversation_input(self, exchange: Exchange, guard: "_Guard") -> ChatInput:
        """Wait for the conversation to be free, then build the prompt's messages from its turns."""
        conversation_id, prompt = exchange.conversation_id, exchange.prompt
        assert conversation_id is not None and prompt is not None
        if self.memory is None:
            raise InvalidRequest(
                "conversation_id: conversations keep their turns, and MINIVAULT_LOG_PROMPTS=false forbids storing "
                "text; send the earlier turns yourself, or set MINIVAULT_LOG_PROMPTS=true"
            )
        guard.inside = True  # the wait and the read can be cut off by shutdown
        await self.memory.acquire(conversation_id)
        try:
            # An ordinary key continues only its own conversations (another's is not_found); with auth off
            # (no key_id) or an admin key, any.
            visible_to = None if exchange.admin else exchange.key_id
            asked = exchange.chat  # the prompt alone, with what it asks beyond text (None: text only)
            chat = await self.memory.chat_input(
                conversation_id, exchange.model, prompt, exchange.system, exchange.options, visible_to,
                format=asked.format if asked else None, think=asked.think if asked else None,
                images=asked.messages[-1].images if asked else (),
            )  # fmt: skip
        except BaseException:
            self.memory.release(conversation_id)
            raise
        finally:
            guard.inside = False
        exchange.chat = chat  # what was sent, turns included: the record reads it
        return chat

    async def run(self, exchange: Exchange) -> dict[str, Any]:
        """Generate the whole answer (waiting in the queue if need be) and return the REST body."""
        async with aclosing(self.stream(exchange)) as chunks:
            async for _ in chunks:
                pass
        return exchange.result()

    def reject(self, caller: Caller, error: MiniVaultError, prompt: object = None, model: object = None) -> None:
        """Log a request refused before it reached the service, with whatever prompt and model it named."""
        exchange = Exchange(
            caller, self.backend, prompt=prompt if isinstance(prompt, str) else None,
            model=model if isinstance(model, str) and model else None,
        )  # fmt: skip
        exchange.status = "error"
        exchange.error = error
        self.finish(exchange)

    async def refuse(
        self, caller: Caller, error: MiniVaultError, prompt: object = None, model: object = None
    ) -> MiniVaultError:
        """Count a refused request against its key's rate limit and log it; returns what to answer:
        `error`, or the 429 RateLimited once the key is over its rate (so a flood of bad requests stays cheap)."""
        if self.rate_limiter is not None:
            try:
                await self.rate_limiter.check(caller.key_id)
            except RateLimited as exc:
                error = exc
            except MiniVaultError:
                pass  # the shared limits' Redis is down: the refusal itself is still the better answer
        self.reject(caller, error, prompt, model)
        return error

    def finish(self, exchange: Exchange) -> None:
        """Time the exchange and hand its record to every consumer."""
        exchange.latency_ms = round((time.perf_counter() - exchange.started) * 1000, 3)
        if exchange.status == "cancelled":
            exchange.completion.done_reason = "cancelled"
        record = exchange.record(self.keep_text)
        for consumer in self.consumers:
            try:
                consumer.consume(record)
            except Exception:
                logger.exception("exchange consumer %r failed on %s", consumer, exchange.id)

    @property
    def in_flight(self) -> int:
        """Exchanges admitted or queued right now."""
        return len(self._guards)

    async def drain(self, grace: float) -> int:
        """Refuse new prompts, give those in flight `grace` seconds, then end the rest; returns how many were ended."""
        self._drain_gate.closed = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
            return 0
        except TimeoutError:
            pass
        remaining = list(self._guards)
        for guard in remaining:
            guard.fire(ShuttingDown(f"MiniVault is shutting down; this answer was cut off after {grace:g} s "
                                    "(MINIVAULT_SHUTDOWN_GRACE)"))  # fmt: skip
        try:
            await asyncio.wait_for(self._idle.wait(), 5)
        except TimeoutError:
            logger.warning("%d exchanges did not end within 5 s of being cut off", len(self._guards))
        return len(remaining)
