"""The history's columns, declared once for SQLite and PostgreSQL: each store's table, its inserts, its
migration and its reads come from `COLUMNS`.

A column is written from one field of ExchangeRecord (as it is, or through `write`) and, unless it is
derived (`day`, `latency_bucket`), reads that field back (`read`, from the stored values by name). Lists and
objects are JSON text. A store's table may also have columns of its own that no record holds (its row id,
PostgreSQL's search vector). A column missing from an existing table is added when the store opens
(`missing`), so a new field is one line here and old databases keep working.
"""

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from operator import attrgetter, itemgetter
from typing import Any

import orjson

from app.schemas import ExchangeRecord, LoggedError, LoggedImage, LoggedToolCall

Stored = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Column:
    """One column of `exchanges`: its types, the record field it is made of, and how it is written and read."""

    name: str
    sqlite: str
    # None: SQLite only.
    pg: str | None
    of: str
    # The field's value -> the stored value; None: stored as it is. Never called with None (stored as NULL).
    write: Callable[[Any], Any] | None = None
    # How it is written when texts may not be kept (MINIVAULT_LOG_PROMPTS=false); None: as with them.
    textless: Callable[[Any], Any] | None = None
    # The stored values by name -> the field's value; None: derived, not read back.
    read: Callable[[Stored], Any] | None = None
    not_null: bool = False
    # PostgreSQL compares it byte-wise (COLLATE "C"), as SQLite does every text: ids, start times and models
    # sort the same whatever the database's locale.
    byte_order: bool = False
    # A text or JSON whose size is the client's (it counts towards a writer's queue bound).
    sized: bool = False

    def sqlite_declaration(self) -> str:
        return f"{self.name} {self.sqlite}{' NOT NULL' if self.not_null else ''}"

    def pg_declaration(self) -> str:
        collate = ' COLLATE "C"' if self.byte_order else ""
        return f"{self.name} {self.pg}{collate}{' NOT NULL' if self.not_null else ''}"


def _dropped(text: str) -> None:
    return None


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _calls_without_arguments(calls: list[LoggedToolCall]) -> str:
    # A log line written with texts, stored by a history that may not keep them (`minivault logs reindex`).
    return orjson.dumps([LoggedToolCall(call.id, call.name, None) for call in calls]).decode()


def _from_json(name: str, each: Callable[..., Any] | None = None) -> Callable[[Stored], Any]:
    def read(stored: Stored) -> Any:
        text = stored[name]
        if text is None:
            return None
        value = orjson.loads(text)
        return [each(**item) for item in value] if each is not None else value

    return read


def _error(stored: Stored) -> LoggedError | None:
    code = stored["error_code"]
    return LoggedError(code, stored["error_message"] or "") if code is not None else None


_CANONICAL_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def ts_text(moment: datetime) -> str:
    """A moment as a stored `ts`: UTC, milliseconds, `Z` (naive times are UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    m = moment.astimezone(UTC)
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}."
            f"{m.microsecond // 1000:03d}Z")  # fmt: skip


# `ts` and `day` are both made of the record's `ts`: the second lookup of a row is the first's answer.
@lru_cache(maxsize=8)
def start_of(ts: str) -> tuple[str, str | None]:
    """A record's `ts` as stored (UTC, "YYYY-MM-DDTHH:MM:SS.mmmZ", as MiniVault writes it) and its UTC day;
    another ISO form is converted, and a `ts` that is not a time is kept as it is, with no day."""
    if _CANONICAL_TS.fullmatch(ts):
        return ts, ts[:10]
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        return ts, None
    canonical = ts_text(moment)
    return canonical, canonical[:10]


LOG_STEP = math.log(1.02)
_SMALLEST_MS = 0.001


def latency_bucket(latency_ms: float) -> int:
    """The 2% wide bucket of SQLite's latency percentiles: bucket b holds 1.02**b <= ms < 1.02**(b+1)."""
    return math.floor(math.log(max(latency_ms, _SMALLEST_MS)) / LOG_STEP)


def _plain(name: str, sqlite: str, pg: str, **more: Any) -> Column:
    return Column(name, sqlite, pg, name, read=itemgetter(name), **more)


def _text(name: str) -> Column:
    return Column(name, "TEXT", "text", name, None, _dropped, itemgetter(name), sized=True)


def _json_column(name: str, each: Callable[..., Any] | None = None, **more: Any) -> Column:
    """A list or object as JSON text; read back as `each(**item)` for each item, with `each`."""
    return Column(name, "TEXT", "text", name, _json, read=_from_json(name, each), sized=True, **more)


# In the tables' order; the first thirteen (id ... response) are where they have always been.
COLUMNS: tuple[Column, ...] = (
    _plain("id", "TEXT", "text", not_null=True, byte_order=True),
    Column(
        "ts", "TEXT", "text", "ts", lambda ts: start_of(ts)[0], read=itemgetter("ts"), not_null=True, byte_order=True
    ),
    Column("day", "TEXT", "text", "ts", lambda ts: start_of(ts)[1], byte_order=True),
    _plain("endpoint", "TEXT", "text", not_null=True),
    _plain("client", "TEXT", "text"),
    _plain("key_id", "TEXT", "text"),
    _plain("conversation_id", "TEXT", "text"),
    _plain("backend", "TEXT", "text", not_null=True),
    _plain("model", "TEXT", "text", byte_order=True),
    _text("prompt"),
    _text("system"),
    _json_column("options"),
    _text("response"),
    _plain("prompt_chars", "INTEGER", "bigint"),
    _plain("response_chars", "INTEGER", "bigint"),
    _plain("status", "TEXT", "text", not_null=True),
    Column("error_code", "TEXT", "text", "error", attrgetter("code"), read=_error),
    Column("error_message", "TEXT", "text", "error", attrgetter("message"), sized=True),
    _plain("done_reason", "TEXT", "text"),
    _plain("prompt_tokens", "INTEGER", "bigint"),
    _plain("completion_tokens", "INTEGER", "bigint"),
    _plain("queue_ms", "REAL", "float8"),
    _plain("ttft_ms", "REAL", "float8"),
    _plain("latency_ms", "REAL", "float8"),
    # PostgreSQL computes exact percentiles from latency_ms itself.
    Column("latency_bucket", "INTEGER", None, "latency_ms", latency_bucket),
    _plain("upstream", "TEXT", "text"),
    _json_column("tools"),
    _json_column("format"),
    _json_column("images", LoggedImage),
    # Without texts, each call keeps its id and name, not its arguments.
    _json_column("tool_calls", LoggedToolCall, textless=_calls_without_arguments),
    _text("thinking"),
    _plain("thinking_chars", "INTEGER", "bigint"),
    _json_column("ignored_options"),
    _plain("dropped_messages", "INTEGER", "bigint"),
)

_ROW_BYTES = 512  # what a row costs besides its sized values (ids, timestamps, numbers, the tuple itself)


class Layout:
    """The columns one store has, in order: its rows made from records, and records read back from its rows."""

    def __init__(self, columns: Iterable[Column]) -> None:
        self.columns = tuple(columns)
        self.names = tuple(column.name for column in self.columns)
        self._values = attrgetter(*(column.of for column in self.columns))
        # (index, writer) of the columns not stored as they are: with texts, and without them.
        writes = [(i, c.write, c.textless or c.write) for i, c in enumerate(self.columns)]
        self._writes = tuple((i, write) for i, write, _ in writes if write is not None)
        self._writes_textless = tuple((i, write) for i, _, write in writes if write is not None)
        self._readers = tuple((column.of, column.read) for column in self.columns if column.read is not None)
        self._sized = itemgetter(*(index for index, column in enumerate(self.columns) if column.sized))

    def row(self, record: ExchangeRecord, keep_text: bool) -> tuple[Any, ...]:
        """The record as a row of these columns (made on the event loop for every exchange: kept lean)."""
        row = list(self._values(record))
        # None is NULL in every column, so only the values present go through their writers (a plain exchange's
        # fields beyond text are all None).
        for index, write in self._writes if keep_text else self._writes_textless:
            value = row[index]
            if value is not None:
                row[index] = write(value)
        return tuple(row)

    def record(self, values: Sequence[Any]) -> ExchangeRecord:
        """The record a row of these columns holds (`values` in `names` order)."""
        stored = dict(zip(self.names, values, strict=True))
        return ExchangeRecord(**{field: read(stored) for field, read in self._readers})

    def row_bytes(self, row: tuple[Any, ...]) -> int:
        """About what the row takes in memory: the texts and JSON it holds, and a fixed part for the rest."""
        return _ROW_BYTES + sum(map(len, filter(None, self._sized(row))))

    def missing(self, present: Iterable[str]) -> list[Column]:
        """These columns, without those `present` names (a table made by an older MiniVault lacks them)."""
        have = set(present)
        return [column for column in self.columns if column.name not in have]


SQLITE = Layout(COLUMNS)
PG = Layout(column for column in COLUMNS if column.pg is not None)
