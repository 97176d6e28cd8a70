"""The writer thread the history stores share: records queued on the event loop, written in batches.

`consume` only makes the row and queues it; one thread wakes per burst, lingers a moment to gather
it into one transaction, and writes it. A failed batch is kept (up to `max_pending` rows) and
retried with the next one. Subclasses say how rows are made (`_row`) and written (`_insert`).

Following the interaction log (`follow`), a row is written only once the log has its line: the log
comes first, so while the log fails (a full disk) the history waits instead of taking the space the
log needs; only lines the log drops (past its own `max_pending`) are stored without it. At most
`max_queue_bytes` of rows wait; past that, refused requests are counted (`on_summarized`) instead of queued.
"""

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Protocol

from app.schemas import ExchangeRecord, RefusedRecord

logger = logging.getLogger(__name__)

BATCH = 2000  # records per transaction, at most
# MINIVAULT_WRITER_QUEUE_BYTES' default, as for the log.
DEFAULT_QUEUE_BYTES = 64 * 1_048_576
# Seconds the history's close waits for the log to write what the history holds back for it.
_LOG_FLUSH_TIMEOUT = 10.0


class FollowedLog(Protocol):
    """What the history needs of the interaction log (app.exchanges.JsonlWriter) to come after it."""

    lines_queued: int
    lines_settled: int
    refusals_summarized: int
    failing: bool

    def notify(self, callback: Callable[[], None]) -> None: ...

    def flush(self, timeout: float | None = None) -> bool: ...


class BatchWriter:
    """Queue, writer thread, flush and retry; `where` names the database in log lines."""

    # What a failed write may raise and still be retried with the next batch.
    _write_errors: ClassVar[tuple[type[BaseException], ...]] = (Exception,)

    def __init__(
        self,
        where: str,
        keep_text: bool,
        linger: float,
        max_pending: int,
        thread_name: str,
        *,
        max_queue_bytes: int = DEFAULT_QUEUE_BYTES,
        on_summarized: Callable[[int], None] | None = None,
    ) -> None:
        self.where = where
        self.keep_text = keep_text
        self.failing = False
        self.last_error: str | None = None
        self.records_written = 0
        self.records_dropped = 0
        self.refusals_summarized = 0
        self._linger = linger
        self._max_pending = max_pending
        self._max_queue_bytes = max_queue_bytes
        self._on_summarized = on_summarized
        self._summarizing = False
        # Bytes queued (counted on the event loop) and written or dropped (counted by the writer thread).
        self._bytes_in = 0
        self._bytes_out = 0
        self._log: FollowedLog | None = None
        self._log_summarized = 0  # the log's refusals_summarized when the last refusal came
        # (the log's line count when it was consumed, its size, the row), waiting for the writer.
        self._records: deque[tuple[int, int, tuple[Any, ...]]] = deque()
        self._pending: list[tuple[Any, ...]] = []  # rows taken by the writer (kept when a write fails)
        self._pending_sizes: list[int] = []
        self._flush_requests: deque[threading.Event] = deque()
        self._wakeup = threading.Event()
        self._hurry = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._write_lock = threading.RLock()  # the writer's connection, and the pending rows

    def bound_queue(self, max_bytes: int, on_summarized: Callable[[int], None] | None = None) -> None:
        """Hold at most `max_bytes` of unwritten rows; past it, refusals are counted by `on_summarized(1)`."""
        self._max_queue_bytes = max_bytes
        self._on_summarized = on_summarized

    def follow(self, log: FollowedLog) -> None:
        """Write only the exchanges `log` has written (it must consume each record before this store does)."""
        self._log = log
        log.notify(self._wakeup.set)

    def _row(self, record: ExchangeRecord) -> tuple[Any, ...]:
        raise NotImplementedError

    def _row_bytes(self, row: tuple[Any, ...]) -> int:
        """About what `row` takes in memory, for the queue's bound."""
        raise NotImplementedError

    def _insert(self, rows: list[tuple[Any, ...]]) -> int:
        """Write `rows` in one transaction, skipping those already there; how many were new."""
        raise NotImplementedError

    def consume(self, record: ExchangeRecord) -> None:
        """Take a finished exchange (on the event loop): make its row and queue it for the writer thread.

        The row is made here, as the JSONL log encodes its line on the loop: the writer thread then does
        almost no Python work per record, so it seldom holds the GIL while the event loop wants it.
        """
        log = self._log
        if type(record) is RefusedRecord and self._refusal_summarized(log):
            return
        try:
            row = self._row(record)
        except TypeError as exc:  # options orjson cannot encode: not storable, and not worth a retry
            logger.error("history %s: exchange %s cannot be stored (%s)", self.where, record.id, exc)
            return
        size = self._row_bytes(row)
        self._bytes_in += size
        self._records.append((log.lines_queued if log is not None else 0, size, row))
        if not self._wakeup.is_set():  # one wake-up per batch, not per record
            self._wakeup.set()

    def _refusal_summarized(self, log: FollowedLog | None) -> bool:
        """Count a refusal instead of queueing it when the log did so too, or this queue is over its bound."""
        summarized_by_log = log is not None and log.refusals_summarized != self._log_summarized
        if summarized_by_log:
            assert log is not None
            self._log_summarized = log.refusals_summarized  # the log counted this one: keep the two alike
        elif self._bytes_in - self._bytes_out <= self._max_queue_bytes:
            self._summarizing = False
            return False
        self.refusals_summarized += 1
        if self._on_summarized is not None:
            self._on_summarized(1)
        if not self._summarizing:
            self._summarizing = True
            logger.warning(
                "history %s: %s; refused requests are counted in minivault_refusals_summarized_total instead of "
                "stored until it drains", self.where,
                "the interaction log summarizes refusals" if summarized_by_log
                else f"over {self._max_queue_bytes} bytes wait to be written (MINIVAULT_WRITER_QUEUE_BYTES)",
            )  # fmt: skip
        return True

    def add_many(self, records: Iterable[ExchangeRecord]) -> int:
        """Insert the records not there yet (same id and start time), in transactions of up to 20,000;
        returns how many were new. Blocking, and needs no writer thread (the reindex command's way)."""
        new = 0
        batch: list[tuple[Any, ...]] = []
        for record in records:
            batch.append(self._row(record))
            if len(batch) >= BATCH * 10:
                new += self._insert(batch)
                batch = []
        if batch:
            new += self._insert(batch)
        return new

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every record consumed before the call is written (or has failed, or waits for the log)."""
        # What the log writes now, the history may write just after; a failing log is not hurried (it retries
        # on its own schedule, and a read of the history must not make it hit a full disk again).
        if self._log is not None and not self._log.failing:
            self._log.flush(timeout)
        if not self._thread.is_alive():
            self._write_queued()
            return True
        done = threading.Event()
        self._flush_requests.append(done)
        self._wakeup.set()
        self._hurry.set()
        return done.wait(timeout)

    def _stop_writer(self) -> None:
        """Write everything queued and stop the thread (or write it here, if the thread never ran)."""
        if self._log is not None and self._records:
            self._log.flush(_LOG_FLUSH_TIMEOUT)
        if self._thread.is_alive():
            self._stopping = True
            self._wakeup.set()
            self._hurry.set()
            self._thread.join()
        else:
            self._write_queued()
        if self._records:
            logger.error(
                "history %s: %d exchanges could not be written (%s)", self.where, len(self._records),
                "the database was failing" if self.failing else "the interaction log could not write them either",
            )  # fmt: skip

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            if self._linger and not (self._stopping or self._flush_requests):
                # Gather a burst into one transaction (each commit costs the full-text index work to merge
                # later); a flush or close cuts the wait short.
                self._hurry.wait(self._linger)
            self._hurry.clear()
            self._wakeup.clear()
            answered = [self._flush_requests.popleft() for _ in range(len(self._flush_requests))]
            self._write_queued()
            for request in answered:
                request.set()
            # Stopping: done once nothing more can be written (the rest waits for a log, or a database, that fails).
            if self._stopping and (self.failing or not self._writable()):
                break
        if self._pending:
            logger.error("history %s: %d exchanges could not be written", self.where, len(self._pending))

    def _writable(self) -> bool:
        """Whether a queued record may be written now (with a followed log: its line is there)."""
        records = self._records
        if not records:
            return False
        return self._log is None or records[0][0] <= self._log.lines_settled

    def _write_queued(self) -> None:
        """Write the records queued so far, in transactions of up to BATCH, keeping a failed batch for later.

        Records arriving meanwhile wait for the next round (and its linger): chasing them would turn a
        busy server's history into a stream of tiny transactions. With a followed log, records whose
        lines the log has not written yet wait too.
        """
        with self._write_lock:
            records = self._records
            settled = self._log.lines_settled if self._log is not None else None
            remaining = len(records)
            while remaining or self._pending:
                pending, sizes = self._pending, self._pending_sizes
                count = min(remaining, BATCH)
                remaining -= count
                for _ in range(count):
                    # Only this thread takes from the left, so a record put back keeps its place.
                    entry = records.popleft()
                    if settled is not None and entry[0] > settled:
                        records.appendleft(entry)
                        remaining = 0
                        break
                    sizes.append(entry[1])
                    pending.append(entry[2])
                if not pending:
                    return
                excess = len(pending) - self._max_pending
                if excess > 0:
                    self.records_dropped += excess
                    self._bytes_out += sum(sizes[:excess])
                    del pending[:excess], sizes[:excess]
                try:
                    self._insert(pending)
                except self._write_errors as exc:  # locked, disk full, server down; the batch is kept either way
                    if not self.failing:
                        logger.error("history %s: write failed (%s); will retry with the next batch", self.where, exc)
                    self.failing = True
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    return
                if self.failing:
                    logger.warning("history %s: writing again", self.where)
                self.failing = False
                self.last_error = None
                self.records_written += len(pending)
                self._bytes_out += sum(sizes)
                self._pending, self._pending_sizes = [], []
