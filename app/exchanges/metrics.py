"""Prometheus metrics (prometheus_client): a consumer of finished exchanges plus live gauges.

Each app gets its own registry, so several apps in one process (tests) never collide. When
PROMETHEUS_MULTIPROC_DIR is set (several uvicorn workers), prometheus_client keeps every value
in files there and `/metrics` adds up all workers' files, whichever worker answers.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from app import errors
from app.schemas import ExchangeRecord

# Seconds; LLM answers span milliseconds (a cached short answer) to minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_CANCELLED = "499"  # nginx's "client closed request"
_OTHER = "other"
_MAX_MODELS = 100


class Metrics:
    """Owns the metric families; `consume` records each finished exchange."""

    # The format generate_latest writes; prometheus_client 0.26's CONTENT_TYPE_LATEST says version=1.0.0.
    content_type = CONTENT_TYPE_PLAIN_0_0_4

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self._multiprocess_dir = multiprocess_dir
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "minivault_requests", "Finished exchanges by endpoint (rest, sse, ws), HTTP status and model.",
            ["endpoint", "status", "model"], registry=registry,
        )  # fmt: skip
        self.refused = Counter(
            "minivault_refused_requests", "Requests refused before reaching a route, by error code.",
            ["code"], registry=registry,
        )  # fmt: skip
        self.in_flight = Gauge(
            "minivault_in_flight", "Generations running upstream now.", registry=registry, multiprocess_mode="livesum"
        )
        self.queued = Gauge(
            "minivault_queued", "Generations waiting for a slot now.", registry=registry, multiprocess_mode="livesum"
        )
        self.latency = Histogram(
            "minivault_upstream_latency_seconds", "Time from admission to the end of the answer.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "minivault_time_to_first_token_seconds", "Time from the request to the first token.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tokens = Counter(
            "minivault_tokens_generated", "Tokens the upstream reported generating.", ["model"], registry=registry
        )
        self.log_lines = Counter(
            "minivault_log_lines", "Interaction log lines written, and lines whose write failed (each counted once, "
            "however often it is retried).",
            ["result"], registry=registry,
        )  # fmt: skip
        # With several upstream hosts (a HostPool): per-host series; the host label is its URL.
        self.host_requests = Counter(
            "minivault_host_requests", "Attempts on each upstream host, by outcome (ok, failed, model_not_found, "
            "cancelled).", ["host", "outcome"], registry=registry,
        )  # fmt: skip
        self.host_running = Gauge(
            "minivault_host_in_flight", "Generations running on each upstream host now.", ["host"],
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.host_cooldowns = Counter(
            "minivault_host_cooldowns",
            "Times an upstream host was cooled down after failing (before its first token, or mid-answer).",
            ["host"], registry=registry,
        )  # fmt: skip
        self.refusals_summarized = Counter(
            "minivault_refusals_summarized", "Refused requests a writer (log, history) counted instead of writing, "
            "its queue being over MINIVAULT_WRITER_QUEUE_BYTES.", ["writer"], registry=registry,
        )  # fmt: skip
        self._request_children: dict[tuple[str, str, str], Any] = {}
        self._model_children: dict[str, tuple[Any, Any, Any]] = {}
        self._written = self.log_lines.labels("written")
        self._failed = self.log_lines.labels("failed")

    def consume(self, record: ExchangeRecord) -> None:
        """Count one finished exchange."""
        model = self._model_label(record)
        if record.status == "ok":
            status = "200"
        elif record.status == "cancelled":
            status = _CANCELLED
        else:
            status = _STATUS_OF.get(record.error.code if record.error else "", "500")
        key = (record.endpoint, status, model)
        counter = self._request_children.get(key)
        if counter is None:  # labels() costs a lock and a lookup: keep the children of the few label sets seen
            counter = self._request_children[key] = self.requests.labels(*key)
        counter.inc()
        per_model = self._model_children.get(model)
        if per_model is None:
            per_model = self._model_children[model] = (
                self.latency.labels(model),
                self.ttft.labels(model),
                self.tokens.labels(model),
            )
        latency, ttft, tokens = per_model
        if record.status == "ok" and record.latency_ms is not None:
            latency.observe((record.latency_ms - (record.queue_ms or 0)) / 1000)
        if record.ttft_ms is not None:
            ttft.observe(record.ttft_ms / 1000)
        if record.completion_tokens:
            tokens.inc(record.completion_tokens)

    def _model_label(self, record: ExchangeRecord) -> str:
        # Model names come from clients: only names that served an answer become label values (at
        # most _MAX_MODELS), so random names cannot grow the series without bound.
        model = record.model or ""
        if model in self._model_children:
            return model
        if record.status != "ok" or len(self._model_children) >= _MAX_MODELS:
            return _OTHER
        return model

    def set_load(self, running: int, waiting: int) -> None:
        """Admission's live counts (its on_change hook)."""
        self.in_flight.set(running)
        self.queued.set(waiting)

    def host_request(self, host: str, outcome: str) -> None:
        self.host_requests.labels(host, outcome).inc()

    def host_in_flight(self, host: str, count: int) -> None:
        self.host_running.labels(host).set(count)

    def host_cooldown(self, host: str) -> None:
        self.host_cooldowns.labels(host).inc()

    def count_refused(self, code: str) -> None:
        self.refused.labels(code).inc()

    def count_log_batch(self, written: int, failed: int) -> None:
        """The log writer's on_batch hook; runs in the writer thread (prometheus_client is thread-safe)."""
        if written:
            self._written.inc(written)
        if failed:
            self._failed.inc(failed)

    def summarized(self, writer: str) -> Callable[[int], None]:
        """The `on_summarized` hook for one writer (`log` or `history`): counts refusals it did not write."""
        return self.refusals_summarized.labels(writer).inc

    def render(self) -> bytes:
        """The text exposition format; reads files in multiprocess mode, so call it off the event loop."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self._multiprocess_dir))
        return generate_latest(registry)

    def close(self) -> None:
        """A worker that exits takes its live gauges with it."""
        if self._multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), str(self._multiprocess_dir))


_STATUS_OF = {
    error.code: str(error.status)
    for error in vars(errors).values()
    if isinstance(error, type) and issubclass(error, errors.MiniVaultError)
}
