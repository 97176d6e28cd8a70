"""One exchange: who asked, what was asked in no API's dialect, the answer so far, and the record it leaves."""

import time
from datetime import UTC, datetime
from typing import Any, TypeVar

from app.backends import Backend, ChatInput, Completion
from app.core.caller import Caller
from app.errors import MiniVaultError
from app.schemas import REFUSED_TEXT_CHARS, ExchangeRecord, LoggedError, RefusedRecord, Status
from app.vocabulary import ThinkingDelta, ToolCallDelta, ToolCalls


class Exchange:
    """One prompt's life: what was asked, the text so far, and the record it leaves.

    What was asked is kept in no API's dialect: the prompt (the last user message), the system
    prompt and options, and either `chat` (the messages to send, built up front) or a
    `conversation_id` whose stored turns are added once the conversation is free.
    """

    __slots__ = (
        "caller", "id", "endpoint", "client", "key_id", "conversation_id", "prompt", "system", "options", "chat",
        "model", "backend", "ts", "started", "announce_queue", "accepted", "admin",
        "parts", "thinking", "tool_calls", "completion", "queue_ms", "ttft_ms", "latency_ms", "status", "error",
    )  # fmt: skip

    def __init__(
        self,
        caller: Caller,
        backend: Backend,
        *,
        prompt: str | None = None,
        model: str | None = None,
        system: str | None = None,
        options: dict[str, Any] | None = None,
        chat: ChatInput | None = None,
        conversation_id: str | None = None,
    ) -> None:
        self.caller = caller
        # Copied out of the caller: read on every record and every admission.
        self.id = caller.request_id
        self.endpoint = caller.endpoint
        self.client = caller.client
        self.key_id = caller.key_id
        self.admin = caller.admin
        self.conversation_id = conversation_id
        # A rejected request has no chat, but whatever prompt it carried is still logged.
        self.prompt = prompt
        self.system = system
        self.options = options
        self.chat = chat
        self.backend = backend.name
        self.model = model or backend.default_model
        # False for dialects whose streams have no way to say "you are number 3 in the queue".
        self.announce_queue = True
        self.ts = datetime.now(UTC)
        self.started = time.perf_counter()
        self.parts: list[str] = []
        # Beside the text: the thinking's pieces and the tool calls, assembled from their deltas.
        self.thinking: list[str] = []
        self.tool_calls = ToolCalls()
        self.completion = Completion()
        self.queue_ms: float | None = None
        # Set once the exchange holds a slot or a place in the queue: an error before that is a refusal,
        # whose record keeps little text (after it, the client may have had queued events, even tokens).
        self.accepted = False
        self.ttft_ms: float | None = None
        self.latency_ms: float | None = None
        self.status: Status = "ok"
        self.error: MiniVaultError | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def absorb(self, event: ThinkingDelta | ToolCallDelta) -> None:
        """Keep an event that is not text: thinking, or a piece of a tool call."""
        if type(event) is ThinkingDelta:
            self.thinking.append(event.text)
        else:
            self.tool_calls.add(event)  # type: ignore[arg-type]

    @property
    def thinking_text(self) -> str | None:
        return "".join(self.thinking) if self.thinking else None

    @property
    def iso_ts(self) -> str:
        """When the exchange started, as the log writes it: UTC, milliseconds, `Z`."""
        return self.ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def result(self) -> dict[str, Any]:
        """The answer as REST returns it, and as the SSE/WS `done` events carry it."""
        completion = self.completion
        return {
            "response": self.text,
            "model": self.model,
            "id": self.id,
            "done_reason": completion.done_reason,
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
            "timings": {"total_ms": self.latency_ms, "ttft_ms": self.ttft_ms, "queue_ms": self.queue_ms},
        }

    def record(self, keep_text: bool) -> ExchangeRecord:
        """The line this exchange leaves in logs/log.jsonl; without `keep_text`, lengths stand in for texts.

        A refusal (an error before admission) is a RefusedRecord keeping at most REFUSED_TEXT_CHARS of each text.
        """
        text = self.text
        prompt, system, model = self.prompt, self.system, self.model
        error = self.error
        logged_error = LoggedError(error.code, error.message) if error else None
        kind = ExchangeRecord
        if self.status == "error" and not self.accepted:
            # A refusal costs its sender nothing, so it must cost little to keep: whole, a flood of huge
            # refused prompts filled the disk and the writer queues.
            kind = RefusedRecord
            prompt, system, model = _cut(prompt), _cut(system), _cut(model)
            if logged_error is not None:
                logged_error.message = _cut(logged_error.message)
        return kind(
            id=self.id,
            ts=self.iso_ts,
            endpoint=self.endpoint,
            client=self.client,
            key_id=self.key_id,
            conversation_id=self.conversation_id,
            backend=self.backend,
            model=model,
            prompt=prompt if keep_text else None,
            system=system if keep_text else None,
            options=self.options,
            response=text if keep_text else None,
            prompt_chars=len(self.prompt) if self.prompt is not None else None,
            response_chars=len(text),
            status=self.status,
            error=logged_error,
            done_reason=self.completion.done_reason,
            prompt_tokens=self.completion.prompt_tokens,
            completion_tokens=self.completion.completion_tokens,
            queue_ms=self.queue_ms,
            ttft_ms=self.ttft_ms,
            latency_ms=self.latency_ms,
            upstream=self.completion.host,
        )


_Text = TypeVar("_Text", str, str | None)


def _cut(text: _Text) -> _Text:
    return text[:REFUSED_TEXT_CHARS] if text is not None and len(text) > REFUSED_TEXT_CHARS else text
