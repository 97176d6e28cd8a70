"""One exchange: who asked, what was asked in no API's dialect, the answer so far, and the record it leaves."""

import time
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from app.backends import Backend, ChatInput, Completion
from app.core.caller import Caller
from app.errors import MiniVaultError
from app.schemas import (
    REFUSED_ITEMS,
    REFUSED_TEXT_CHARS,
    ExchangeRecord,
    LoggedError,
    LoggedImage,
    LoggedToolCall,
    RefusedRecord,
    Status,
)
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
        """The answer as REST returns it, and as the SSE/WS `done` events carry it (`thinking` when there was any)."""
        completion = self.completion
        result: dict[str, Any] = {
            "response": self.text,
            "model": self.model,
            "id": self.id,
            "done_reason": completion.done_reason,
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
            "timings": {"total_ms": self.latency_ms, "ttft_ms": self.ttft_ms, "queue_ms": self.queue_ms},
        }
        if self.thinking:
            result["thinking"] = "".join(self.thinking)
        return result

    def record(self, keep_text: bool) -> ExchangeRecord:
        """The line this exchange leaves in logs/log.jsonl; without `keep_text`, lengths stand in for texts.

        A refusal (an error before admission) is a RefusedRecord keeping at most REFUSED_TEXT_CHARS of each text.
        """
        text = self.text
        prompt, system, model = self.prompt, self.system, self.model
        error = self.error
        logged_error = LoggedError(error.code, error.message) if error else None
        kind = ExchangeRecord
        refused = self.status == "error" and not self.accepted
        if refused:
            # A refusal costs its sender nothing, so it must cost little to keep: whole, a flood of huge
            # refused prompts filled the disk and the writer queues.
            kind = RefusedRecord
            prompt, system, model = _cut(prompt), _cut(system), _cut(model)
            if logged_error is not None:
                logged_error.message = _cut(logged_error.message)
        completion = self.completion
        record = kind(
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
            done_reason=completion.done_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            queue_ms=self.queue_ms,
            ttft_ms=self.ttft_ms,
            latency_ms=self.latency_ms,
            upstream=completion.host,
        )
        chat = self.chat
        # The fast path: a plain exchange's record is built as it was before tools, formats and images.
        if (chat is not None and not chat.plain) or self.thinking or self.tool_calls:
            _beyond_text(self, record, keep_text, refused)
        if completion.ignored_options:
            record.ignored_options = list(completion.ignored_options)
        if completion.dropped_messages:
            record.dropped_messages = completion.dropped_messages
        return record


_Text = TypeVar("_Text", str, str | None)


def _cut(text: _Text) -> _Text:
    return text[:REFUSED_TEXT_CHARS] if text is not None and len(text) > REFUSED_TEXT_CHARS else text


def _beyond_text(exchange: Exchange, record: ExchangeRecord, keep_text: bool, refused: bool) -> None:
    """Fill in what the exchange asked and produced beyond text: tools, format, images, tool calls, thinking.

    A refusal keeps REFUSED_ITEMS of each list and REFUSED_TEXT_CHARS of each text, as it does of its prompt.
    """
    items, cut = (REFUSED_ITEMS, _cut) if refused else (None, _whole)
    chat = exchange.chat
    if chat is not None:
        if chat.tools:
            record.tools = [cut(tool.name) for tool in chat.tools[:items]]
        if chat.format is not None:
            record.format = chat.format.describe()
            if refused and isinstance(record.format, dict):
                schema = orjson.dumps(record.format).decode()
                if len(schema) > REFUSED_TEXT_CHARS:
                    record.format = schema[:REFUSED_TEXT_CHARS]  # its JSON text, cut: no longer a schema
        images = [image for message in chat.messages for image in message.images][:items]
        if images:
            record.images = [LoggedImage(**image.describe()) for image in images]
    if exchange.tool_calls:
        record.tool_calls = [
            LoggedToolCall(cut(call.id), cut(call.name), cut(call.arguments) if keep_text else None)
            for call in exchange.tool_calls.calls()[:items]
        ]
    thinking = exchange.thinking_text
    if thinking is not None:
        record.thinking_chars = len(thinking)
        record.thinking = cut(thinking) if keep_text else None


def _whole(text: _Text) -> _Text:
    return text
