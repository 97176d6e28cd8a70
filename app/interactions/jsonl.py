"""Append-only JSON Lines log written by one thread, so the event loop never waits on the disk."""

import asyncio
import errno
import logging
import os
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Any

import orjson

logger = logging.getLogger(__name__)

_STOP = None


class JsonlWriter:
    """Queue records from the event loop; a writer thread appends them in batches.

    Each batch is one `write()` on an O_APPEND descriptor, so lines from concurrent
    writers (threads or worker processes) never interleave. A failed write keeps up to
    `max_pending` lines to retry with the next batch and marks the log as failing.
    """

    def __init__(self, path: Path, max_pending: int = 100_000) -> None:
        self.path = Path(path)
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
            item: bytes | threading.Event | None = self._queue.get()
            # Drain whatever else is queued so one write() carries the whole burst.
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
        # Opened per batch, so a rotated or deleted file is recreated instead of written to the void.
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                if written == 0:
                    raise OSError(errno.EIO, "write() wrote nothing")
                view = view[written:]
        finally:
            os.close(fd)
