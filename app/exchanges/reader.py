"""Reading the interaction log back: the current file and its rotated ones, oldest first.

Readers never trust a line: a blank one is passed over, and a torn one (a killed writer) or a
foreign one is reported to `on_skip` (one call per line) and skipped, so one bad line never
hides the rest of the history.
"""

import json
import os
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from app.schemas import ExchangeRecord, read_record

SkipHandler = Callable[[bytes], None]


def log_files(path: Path) -> list[Path]:
    """The rotated files (log.jsonl.N ... log.jsonl.1) then the log itself: those that exist, oldest first."""
    rotated: list[tuple[int, Path]] = []
    if path.parent.is_dir():
        prefix = f"{path.name}."
        for entry in os.scandir(path.parent):
            suffix = entry.name.removeprefix(prefix)
            if entry.name.startswith(prefix) and suffix.isdigit() and entry.is_file():
                rotated.append((int(suffix), Path(entry.path)))
    files = [file for _, file in sorted(rotated, reverse=True)]
    return [*files, path] if path.is_file() else files


def iter_lines(path: Path, on_progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """Every non-blank line of the log and its rotated files, oldest first; `on_progress(n)` gets the bytes read."""
    for file in log_files(path):
        try:
            handle = file.open("rb")
        except FileNotFoundError:  # rotated away since it was listed
            continue
        with handle:
            for line in handle:
                if on_progress is not None:
                    on_progress(len(line))
                if line.strip():
                    yield line


def read_records(
    path: Path, on_skip: SkipHandler | None = None, on_progress: Callable[[int], None] | None = None
) -> Iterator[ExchangeRecord]:
    """Each valid exchange record, oldest first."""
    for line in iter_lines(path, on_progress):
        try:
            record = read_record(line)
        except ValueError:
            if on_skip is not None:
                on_skip(line)
            continue
        yield record


def read_dicts(path: Path, on_skip: SkipHandler | None = None) -> Iterator[dict[str, Any]]:
    """Each line that is a JSON object, as it was written (for printing), oldest first."""
    for line in iter_lines(path):
        record = parse_line(line)
        if record is None:
            if on_skip is not None:
                on_skip(line)
            continue
        yield record


def parse_line(line: bytes) -> dict[str, Any] | None:
    """The JSON object on this line, or None for a torn or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def last_lines(path: Path, count: int, block: int = 65536) -> tuple[list[bytes], int]:
    """The last `count` non-blank lines (from the rotated files too when the log holds fewer), and the offset
    the log ends at. Each file is read backwards in blocks, so a large log costs little."""
    lines: list[bytes] = []
    end = 0
    for file in reversed(log_files(path)):
        if len(lines) >= count and file != path:
            break
        try:
            found, size = _last_lines_of(file, count - len(lines), block)
        except FileNotFoundError:
            continue
        if file == path:
            end = size
        lines = found + lines
    return lines, end


def _last_lines_of(path: Path, count: int, block: int) -> tuple[list[bytes], int]:
    with path.open("rb") as file:
        file.seek(0, os.SEEK_END)
        end = position = file.tell()
        data = b""
        while count and position > 0 and data.count(b"\n") <= count:
            position = max(0, position - block)
            file.seek(position)
            data = file.read(end - position)
    lines = [line for line in data.splitlines() if line.strip()]
    return (lines[-count:] if count else []), end


def follow(path: Path, offset: int, interval: float = 0.5) -> Generator[bytes, None, None]:
    """Lines appended to the log after `offset`; survives the file being created, truncated, rotated or replaced.

    The file is opened now, and read to its end before switching to a new one, so the lines written
    just before a rotation are not lost.
    """
    file: BinaryIO | None
    try:
        file = path.open("rb")
    except FileNotFoundError:
        file = None
    else:
        file.seek(offset if os.fstat(file.fileno()).st_size >= offset else 0)
    return _follow(path, file, interval)


def _follow(path: Path, file: BinaryIO | None, interval: float) -> Generator[bytes, None, None]:
    partial = b""
    try:
        while True:
            if file is None:
                try:
                    file = path.open("rb")
                except FileNotFoundError:
                    time.sleep(interval)
                    continue
            chunk = file.read()
            if chunk:
                *complete, partial = (partial + chunk).split(b"\n")
                yield from (line for line in complete if line.strip())
                continue
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino != os.fstat(file.fileno()).st_ino:
                file.close()
                file, partial = None, b""
                continue
            if current is not None and current.st_size < file.tell():  # truncated
                file.seek(0)
                partial = b""
                continue
            time.sleep(interval)
    finally:
        if file is not None:
            file.close()
