"""Append-only JSON Lines log written by one thread, so the event loop never waits on the disk."""

import asyncio
import errno
import fcntl
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from app.schemas import ExchangeRecord, RefusedRecord

logger = logging.getLogger(__name__)

_BATCH_LINES = 512
# MINIVAULT_WRITER_QUEUE_BYTES' default: what each writer (this log, the history) may hold unwritten.
DEFAULT_QUEUE_BYTES = 64 * 1_048_576


class JsonlWriter:
    """Records are serialised on the event loop and appended by a writer thread, in batches.

    Each batch is one `write()` on an O_APPEND descriptor, under an flock, so lines from concurrent
    writers (threads or worker processes) never interleave. The file is reopened
    when it is rotated or deleted. A failed write keeps up to `max_pending` lines, marks the log
    as failing and is retried every `retry_seconds` (a full disk is not freed by trying harder);
    a write cut short (a full disk) is cut back to its last whole line, so the file never holds a
    partial line between whole ones. `linger` seconds let a burst gather into one batch.
    The file is created readable by its owner only, and a torn last line (left by a killed
    process) is ended before the first new line, so no record is glued to a fragment.
    `on_batch(written, failed)` is told the lines each attempt wrote and the lines that failed for
    the first time (the metrics counters: a line retried ten times is one failed line).

    At most `max_queue_bytes` of lines wait unwritten: past that, a RefusedRecord (a request
    refused before admission) is counted (`on_summarized(1)`, one warning line per episode)
    instead of queued; every other record is always queued. `lines_settled` (lines written or
    dropped, in order) lets the history wait for the log (`notify`): it writes what the log has
    written, and what the log dropped past `max_pending`.

    With `max_bytes`, a batch that would take the file past it first rotates the file
    (log.jsonl -> log.jsonl.1 -> ... -> log.jsonl.`backups`, the oldest dropped) and goes
    whole into a fresh one, so no line is ever split; a batch larger than the limit gets
    a file of its own. Writers in several processes serialise the size check, the rename
    and the write with an flock on `<log>.lock`, and a writer whose file was rotated by
    another reopens the new one (the inode check) before writing.

    The thread does almost no Python work per line (it takes whole batches off a deque), so
    it rarely holds the GIL while the event loop wants it.
    """

    def __init__(
        self,
        path: Path,
        max_pending: int = 100_000,
        linger: float = 0.002,
        on_batch: Callable[[int, int], None] | None = None,
        max_bytes: int | None = None,
        backups: int = 5,
        max_queue_bytes: int = DEFAULT_QUEUE_BYTES,
        on_summarized: Callable[[int], None] | None = None,
        retry_seconds: float = 0.5,
    ) -> None:
        self.path = Path(path)
        self._max_bytes = max_bytes
        self._backups = backups
        self._lock_fd: int | None = None
        self._on_batch = on_batch
        self.failing = False
        self.last_error: str | None = None
        self.lines_written = 0
        self.lines_dropped = 0
        # Lines queued (counted on the event loop) and lines written or dropped (counted by the writer
        # thread), both since the start: each counter has a single writer, so neither needs a lock.
        self.lines_queued = 0
        self.lines_settled = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._max_queue_bytes = max_queue_bytes
        self._on_summarized = on_summarized
        self.refusals_summarized = 0
        self._summarizing = False
        self._listeners: list[Callable[[], None]] = []
        self._failed_counted = 0  # lines at the head of _pending already counted as failed
        self._kept = 0  # bytes of the batch a failed write left on the disk (whole lines only)
        self._retry_seconds = retry_seconds
        self._retry_at = 0.0
        self._linger = linger
        self._max_pending = max_pending
        self._lines: deque[bytes] = deque()
        self._pending: list[bytes] = []
        self._flush_requests: deque[threading.Event] = deque()
        self._wakeup = threading.Event()
        self._stopping = False
        self._fd: int | None = None
        self._inode: int | None = None
        self._thread = threading.Thread(target=self._run, name="minivault-log-writer", daemon=True)

    @property
    def state(self) -> str:
        """`ok` or `failing`, as /health reports it."""
        return "failing" if self.failing else "ok"

    def start(self) -> None:
        self._thread.start()

    def consume(self, record: ExchangeRecord) -> None:
        """Take a finished exchange (the generation service calls this)."""
        self.write(record)

    def write(self, record: ExchangeRecord | dict[str, Any]) -> None:
        """Queue one record; never blocks and never raises for disk trouble."""
        if type(record) is RefusedRecord and self._refusal_summarized():
            return
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        self._bytes_in += len(line)
        self.lines_queued += 1
        self._lines.append(line)
        if not self._wakeup.is_set():  # one wake-up per batch, not per line
            self._wakeup.set()

    def _refusal_summarized(self) -> bool:
        """Over the queue's bound, count a refusal instead of queueing it (one warning per episode)."""
        if self._bytes_in - self._bytes_out <= self._max_queue_bytes:
            self._summarizing = False
            return False
        self.refusals_summarized += 1
        if self._on_summarized is not None:
            self._on_summarized(1)
        if not self._summarizing:
            self._summarizing = True
            logger.warning(
                "interaction log %s: over %d bytes wait to be written (MINIVAULT_WRITER_QUEUE_BYTES); refused "
                "requests are counted in minivault_refusals_summarized_total instead of logged until it drains",
                self.path, self._max_queue_bytes,
            )  # fmt: skip
        return True

    def notify(self, callback: Callable[[], None]) -> None:
        """Call `callback` (in the writer thread) each time lines were written or dropped (`lines_settled` grew)."""
        self._listeners.append(callback)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every record queued before the call has been written or has failed."""
        done = threading.Event()
        self._flush_requests.append(done)
        self._wakeup.set()
        return done.wait(timeout)

    async def aclose(self) -> None:
        """Flush everything queued so far, then stop the writer thread."""
        if self._thread.is_alive():
            self._stopping = True
            self._wakeup.set()
            await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        while True:
            # While writes fail, wake up for the next retry even if no record comes.
            self._wakeup.wait(max(0.0, self._retry_at - time.monotonic()) if self._pending else None)
            if self._linger and not (self._stopping or self._flush_requests):
                time.sleep(self._linger)
            self._wakeup.clear()
            # Flush requests first: every line queued before them is taken just below.
            answered = [self._flush_requests.popleft() for _ in range(len(self._flush_requests))]
            if answered or self._stopping:
                self._retry_at = 0.0  # a flush or a close tries a failing disk once more, now
            remaining = len(self._lines)
            # Bounded slices: between them the thread sits in write(), which releases the GIL,
            # so the event loop never waits long for it.
            while remaining:
                count = min(remaining, _BATCH_LINES)
                self._take(count)
                remaining -= count
                if self._due():
                    self._flush()
            if self._pending and self._due():
                self._flush()  # lines kept from an earlier failed write
            for request in answered:
                request.set()
            if self._stopping and not self._lines:
                break
        self._close_file()
        self._close_lock()
        if self._pending:
            logger.error("interaction log %s: %d lines could not be written", self.path, len(self._pending))

    def _due(self) -> bool:
        return not self.failing or time.monotonic() >= self._retry_at

    def _take(self, count: int) -> None:
        lines = self._lines
        self._pending.extend([lines.popleft() for _ in range(count)])
        excess = len(self._pending) - self._max_pending
        if excess > 0:
            self.lines_dropped += excess
            self._bytes_out += sum(len(line) for line in self._pending[:excess])
            self._failed_counted = max(0, self._failed_counted - excess)
            del self._pending[:excess]
            self._settled(excess)

    def _flush(self) -> None:
        pending = self._pending
        data = b"".join(pending)
        self._kept = 0
        try:
            self._append(data)
        except OSError as exc:
            self._close_file()
            self._close_lock()
            # The whole lines a short write got onto the disk stay there (see _write_all); the rest waits.
            whole = data.count(b"\n", 0, self._kept)
            if whole:
                self._bytes_out += self._kept
                self.lines_written += whole
                self._failed_counted = max(0, self._failed_counted - whole)
                del pending[:whole]
            newly_failed = len(pending) - self._failed_counted
            self._failed_counted = len(pending)
            if not self.failing:
                logger.error(
                    "interaction log %s: write failed (%s); retrying every %g s", self.path, exc, self._retry_seconds
                )
            self.failing = True
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._retry_at = time.monotonic() + self._retry_seconds
            if self._on_batch is not None:
                self._on_batch(whole, newly_failed)
            if whole:
                self._settled(whole)
            return
        if self.failing:
            logger.warning("interaction log %s: writing again", self.path)
        self.failing = False
        self.last_error = None
        self.lines_written += len(pending)
        self._bytes_out += len(data)
        self._failed_counted = 0
        if self._on_batch is not None:
            self._on_batch(len(pending), 0)
        self._pending = []
        self._settled(len(pending))

    def _settled(self, count: int) -> None:
        self.lines_settled += count
        for listener in self._listeners:
            listener()

    def _append(self, data: bytes) -> None:
        # Always under a lock, rotating or not: a short write is cut back by offset (see _write_all),
        # which is only safe while no other writer appends. Without rotation the file's own lock does.
        if self._max_bytes is None:
            fd = self._file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self._write_all(fd, data, os.fstat(fd).st_size)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return
        lock = self._lock()
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            fd = self._file()
            size = os.fstat(fd).st_size
            if size and size + len(data) > self._max_bytes:
                self._rotate()
                fd = self._file()
                size = os.fstat(fd).st_size
            self._write_all(fd, data, size)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

    def _rotate(self) -> None:
        """log.jsonl.(N-1) -> .N, ..., log.jsonl -> .1 (replacing the oldest); called holding the lock."""
        self._close_file()
        for number in range(self._backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{number + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _lock(self) -> int:
        if self._lock_fd is None:
            lock = self.path.with_name(f"{self.path.name}.lock")
            try:
                self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            except FileNotFoundError:  # the folder is not there yet (a file in its place fails on open, as it should)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        return self._lock_fd

    def _close_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _write_all(self, fd: int, data: bytes, start: int) -> None:
        """Write `data` at the end of the file (which is `start` bytes long); on failure, leave only whole lines.

        A full disk takes part of a write and refuses the rest: the file is cut back to the last whole
        line written (`self._kept` bytes of `data`), so no fragment is left for the next batch to follow.
        """
        view = memoryview(data)
        done = 0
        try:
            while done < len(data):
                written = os.write(fd, view[done:])
                if written == 0:
                    raise OSError(errno.EIO, "write() wrote nothing")
                done += written
        except OSError:
            if done:
                kept = data.rfind(b"\n", 0, done) + 1
                try:
                    os.ftruncate(fd, start + kept)
                except OSError as exc:  # the torn line is ended when the file is next opened
                    logger.error("interaction log %s: cannot cut back a partial write (%s)", self.path, exc)
                self._kept = kept
            raise

    def _file(self) -> int:
        """The open descriptor, reopened when the file was rotated or deleted since the last batch."""
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if self._fd is not None and current == self._inode:
            return self._fd
        self._close_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fd, self._inode = fd, os.fstat(fd).st_ino
        _end_torn_line(self.path, fd)
        return fd

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._inode = None


def _end_torn_line(path: Path, fd: int) -> None:
    """If the file ends mid-line (a process was killed while writing), end that line first."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or not info.st_size:
        return
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        last = file.read(1)
    if last != b"\n":
        logger.warning("interaction log ends with a torn line (a killed writer?); starting a new line after it")
        os.write(fd, b"\n")
