"""The writer thread the history stores share: records queued on the event loop, written in batches.

`consume` only makes the row and queues it; one thread wakes per burst, lingers a moment to gather
it into one transaction, and writes it. A failed batch is kept (up to `max_pending` rows) and
retried with the next one. Subclasses say how rows are made (`_row`) and written (`_insert`).
"""

import logging
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any, ClassVar

from app.schemas import ExchangeRecord

logger = logging.getLogger(__name__)

BATCH = 2000  # records per transaction, at most


class BatchWriter:
    """Queue, writer thread, flush and retry; `where` names the database in log lines."""

    # What a failed write may raise and still be retried with the next batch.
    _write_errors: ClassVar[tuple[type[BaseException], ...]] = (Exception,)

    def __init__(self, where: str, keep_text: bool, linger: float, max_pending: int, thread_name: str) -> None:
        self.where = where
        self.keep_text = keep_text
        self.failing = False
        self.last_error: str | None = None
        self.records_written = 0
        self.records_dropped = 0
        self._linger = linger
        self._max_pending = max_pending
        self._records: deque[tuple[Any, ...]] = deque()  # rows waiting for the writer
        self._pending: list[tuple[Any, ...]] = []  # rows taken by the writer (kept when a write fails)
        self._flush_requests: deque[threading.Event] = deque()
        self._wakeup = threading.Event()
        self._hurry = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._write_lock = threading.RLock()  # the writer's connection, and the pending rows

    def _row(self, record: ExchangeRecord) -> tuple[Any, ...]:
        raise NotImplementedError

    def _insert(self, rows: list[tuple[Any, ...]]) -> int:
        """Write `rows` in one transaction, skipping those already there; how many were new."""
        raise NotImplementedError

    def consume(self, record: ExchangeRecord) -> None:
        """Take a finished exchange (on the event loop): make its row and queue it for the writer thread.

        The row is made here, as the JSONL log encodes its line on the loop: the writer thread then does
        almost no Python work per record, so it seldom holds the GIL while the event loop wants it.
        """
        try:
            row = self._row(record)
        except TypeError as exc:  # options orjson cannot encode: not storable, and not worth a retry
            logger.error("history %s: exchange %s cannot be stored (%s)", self.where, record.id, exc)
            return
        self._records.append(row)
        if not self._wakeup.is_set():  # one wake-up per batch, not per record
            self._wakeup.set()

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
        """Block until every record consumed before the call is written (or has failed)."""
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
        if self._thread.is_alive():
            self._stopping = True
            self._wakeup.set()
            self._hurry.set()
            self._thread.join()
        else:
            self._write_queued()

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
            if self._stopping and not self._records:
                break
        if self._pending:
            logger.error("history %s: %d exchanges could not be written", self.where, len(self._pending))

    def _write_queued(self) -> None:
        """Write the records queued so far, in transactions of up to BATCH, keeping a failed batch for later.

        Records arriving meanwhile wait for the next round (and its linger): chasing them would turn a
        busy server's history into a stream of tiny transactions.
        """
        with self._write_lock:
            records = self._records
            remaining = len(records)
            while remaining or self._pending:
                count = min(remaining, BATCH)
                remaining -= count
                self._pending.extend([records.popleft() for _ in range(count)])
                excess = len(self._pending) - self._max_pending
                if excess > 0:
                    self.records_dropped += excess
                    del self._pending[:excess]
                try:
                    self._insert(self._pending)
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
                self.records_written += len(self._pending)
                self._pending = []
