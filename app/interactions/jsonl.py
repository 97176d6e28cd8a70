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

from app.schemas import ExchangeRecord

logger = logging.getLogger(__name__)

_BATCH_LINES = 512


class JsonlWriter:
    """Records are serialised on the event loop and appended by a writer thread, in batches.

    Each batch is one `write()` on an O_APPEND descriptor, so lines from concurrent writers
    (threads or worker processes) never interleave. The file is reopened when it is rotated
    or deleted. A failed write keeps up to `max_pending` lines to retry with the next batch
    and marks the log as failing. `linger` seconds let a burst gather into one batch.
    The file is created readable by its owner only, and a torn last line (left by a killed
    process) is ended before the first new line, so no record is glued to a fragment.
    `on_batch(written, failed)` is told the outcome of every batch (the metrics counters).

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
        self._lines.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        if not self._wakeup.is_set():  # one wake-up per batch, not per line
            self._wakeup.set()

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
            self._wakeup.wait()
            if self._linger and not (self._stopping or self._flush_requests):
                time.sleep(self._linger)
            self._wakeup.clear()
            # Flush requests first: every line queued before them is taken just below.
            answered = [self._flush_requests.popleft() for _ in range(len(self._flush_requests))]
            remaining = len(self._lines)
            # Bounded slices: between them the thread sits in write(), which releases the GIL,
            # so the event loop never waits long for it.
            while remaining:
                count = min(remaining, _BATCH_LINES)
                self._take(count)
                remaining -= count
                self._flush()
            if self._pending:
                self._flush()  # lines kept from an earlier failed write
            for request in answered:
                request.set()
            if self._stopping and not self._lines:
                break
        self._close_file()
        self._close_lock()
        if self._pending:
            logger.error("interaction log %s: %d lines could not be written", self.path, len(self._pending))

    def _take(self, count: int) -> None:
        lines = self._lines
        self._pending.extend([lines.popleft() for _ in range(count)])
        excess = len(self._pending) - self._max_pending
        if excess > 0:
            self.lines_dropped += excess
            del self._pending[:excess]

    def _flush(self) -> None:
        try:
            self._append(b"".join(self._pending))
        except OSError as exc:
            self._close_file()
            self._close_lock()
            if not self.failing:
                logger.error("interaction log %s: write failed (%s); will retry with the next batch", self.path, exc)
            self.failing = True
            self.last_error = f"{type(exc).__name__}: {exc}"
            if self._on_batch is not None:
                self._on_batch(0, len(self._pending))
            return
        if self.failing:
            logger.warning("interaction log %s: writing again", self.path)
        self.failing = False
        self.last_error = None
        self.lines_written += len(self._pending)
        if self._on_batch is not None:
            self._on_batch(len(self._pending), 0)
        self._pending = []

    def _append(self, data: bytes) -> None:
        if self._max_bytes is None:
            self._write_all(self._file(), data)
            return
        lock = self._lock()
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            fd = self._file()
            size = os.fstat(fd).st_size
            if size and size + len(data) > self._max_bytes:
                self._rotate()
                fd = self._file()
            self._write_all(fd, data)
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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.path.with_name(f"{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        return self._lock_fd

    def _close_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written == 0:
                raise OSError(errno.EIO, "write() wrote nothing")
            view = view[written:]

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
