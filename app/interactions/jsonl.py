"""Append-only JSON Lines log written by one thread, so the event loop never waits on the disk."""

import asyncio
import errno
import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

logger = logging.getLogger(__name__)

_STOP = None


class JsonlWriter:
    """Queue records from the event loop; a writer thread appends them in batches.

    Each batch is one `write()` on an O_APPEND descriptor, so lines from concurrent
    writers (threads or worker processes) never interleave. The file is reopened when it
    is rotated or deleted. A failed write keeps up to `max_pending` lines to retry with
    the next batch and marks the log as failing. `linger` seconds let a burst gather.
    """

    def __init__(self, path: Path, max_pending: int = 100_000, linger: float = 0.002) -> None:
        self.path = Path(path)
        self._linger = linger
        self._fd: int | None = None
        self._inode: int | None = None
        self.failing = False
        self.last_error: str | None = None
        self.lines_written = 0
        self.lines_dropped = 0
        self._queue: queue.SimpleQueue[bytes | threading.Event | None] = queue.SimpleQueue()
        self._pending: deque[bytes] = deque(maxlen=max_pending)
        self._thread = threading.Thread(target=self._run, name="minivault-log-writer", daemon=True)

    @property
    def state(self) -> str:
        """`ok` or `failing`, as /health reports it."""
        return "failing" if self.failing else "ok"

    def start(self) -> None:
        self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record; never blocks and never raises for disk trouble."""
        self._queue.put(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every record queued before the call has been written or has failed."""
        marker = threading.Event()
        self._queue.put(marker)
        return marker.wait(timeout)

    async def aclose(self) -> None:
        """Flush everything queued so far, then stop the writer thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            markers: list[threading.Event] = []
            first = self._queue.get()
            if isinstance(first, bytes) and self._linger:
                # Let a burst gather: one write() and one GIL hand-off per batch instead of per line.
                time.sleep(self._linger)
            item: bytes | threading.Event | None = first
            while True:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, threading.Event):
                    markers.append(item)
                else:
                    self._add_pending(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if self._pending:
                self._flush()
            for marker in markers:
                marker.set()
        self._close_file()
        if self._pending:
            logger.error("interaction log %s: %d lines could not be written", self.path, len(self._pending))

    def _add_pending(self, line: bytes) -> None:
        if len(self._pending) == self._pending.maxlen:
            self.lines_dropped += 1
        self._pending.append(line)

    def _flush(self) -> None:
        data = b"".join(self._pending)
        try:
            self._append(data)
        except OSError as exc:
            self._close_file()
            if not self.failing:
                logger.error("interaction log %s: write failed (%s); will retry with the next batch", self.path, exc)
            self.failing = True
            self.last_error = f"{type(exc).__name__}: {exc}"
            return
        if self.failing:
            logger.warning("interaction log %s: writing again", self.path)
        self.failing = False
        self.last_error = None
        self.lines_written += len(self._pending)
        self._pending.clear()

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        fd = self._file()
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
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fd, self._inode = fd, os.fstat(fd).st_ino
        return fd

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._inode = None
