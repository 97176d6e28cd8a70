"""The exchange history in SQLite: every finished exchange, searchable (FTS5), paged, and summed per day.

Writes never touch the event loop: `consume` only queues the record, and one writer thread inserts
what has gathered in one transaction (the full-text index and the per-day counts are updated by one
statement per batch, which keeps FTS5 fast). Reads run in worker threads, each on a connection of
its own; WAL mode lets them read while the writer writes, in this process or another worker's.

`logs/log.jsonl` stays the source of truth: `minivault logs reindex` refills this database from it
through `add_many`, which works without the writer thread and skips exchanges already there.
"""

import asyncio
import base64
import binascii
import logging
import math
import queue
import re
import sqlite3
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson

from app.errors import InvalidRequest
from app.schemas import ExchangeRecord, LoggedError
from app.store.base import HistoryPage, HistoryQuery

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
# Plain statements (no executescript: it would commit the migration's transaction half-way).
_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS exchanges (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        ts TEXT NOT NULL,
        t_ms INTEGER,
        day TEXT,
        endpoint TEXT NOT NULL,
        client TEXT,
        key_id TEXT,
        conversation_id TEXT,
        backend TEXT NOT NULL,
        model TEXT,
        prompt TEXT,
        system TEXT,
        options TEXT,
        response TEXT,
        prompt_chars INTEGER,
        response_chars INTEGER,
        status TEXT NOT NULL,
        error_code TEXT,
        error_message TEXT,
        done_reason TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        queue_ms REAL,
        ttft_ms REAL,
        latency_ms REAL
    )""",
    # An exchange is its id and start time: clients may choose ids (X-Request-ID, websocket `id`) and reuse
    # them, and a second exchange under an old id is not a duplicate; a line read twice (reindex) is.
    "CREATE UNIQUE INDEX IF NOT EXISTS exchanges_by_id ON exchanges (id, ts)",
    "CREATE INDEX IF NOT EXISTS exchanges_by_model ON exchanges (model, seq)",
    "CREATE INDEX IF NOT EXISTS exchanges_by_status ON exchanges (status, seq)",
    "CREATE INDEX IF NOT EXISTS exchanges_by_time ON exchanges (t_ms)",
    "CREATE INDEX IF NOT EXISTS exchanges_by_latency ON exchanges (day, model, latency_ms)",
    # External content: the texts live once, in `exchanges`; the index holds only the words.
    """CREATE VIRTUAL TABLE IF NOT EXISTS exchanges_text USING fts5 (
        prompt, response, content = 'exchanges', content_rowid = 'seq', tokenize = 'unicode61 remove_diacritics 2'
    )""",
    # One row per UTC day and model ('' for none), kept up to date by every insert: /history/stats reads these.
    """CREATE TABLE IF NOT EXISTS exchange_days (
        day TEXT NOT NULL,
        model TEXT NOT NULL,
        count INTEGER NOT NULL,
        ok INTEGER NOT NULL,
        error INTEGER NOT NULL,
        cancelled INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        latencies INTEGER NOT NULL,
        PRIMARY KEY (day, model)
    ) WITHOUT ROWID""",
]
_COLUMNS = (
    "id, ts, t_ms, day, endpoint, client, key_id, conversation_id, backend, model, prompt, system, options, "
    "response, prompt_chars, response_chars, status, error_code, error_message, done_reason, prompt_tokens, "
    "completion_tokens, queue_ms, ttft_ms, latency_ms"
)
_INSERT = f"INSERT OR IGNORE INTO exchanges ({_COLUMNS}) VALUES ({', '.join('?' * 25)})"
# Run once per batch over the rows the batch added (seq > the largest before it); NOT INDEXED keeps the
# planner on that rowid range (an index on `day` would otherwise tempt it into a full scan).
_INDEX_TEXT = (
    "INSERT INTO exchanges_text (rowid, prompt, response) SELECT seq, prompt, response FROM exchanges NOT INDEXED "
    "WHERE seq > ? AND (prompt IS NOT NULL OR response IS NOT NULL)"
)
_COUNT_DAYS = """
    INSERT INTO exchange_days
    SELECT day, COALESCE(model, ''), count(*), count(status = 'ok' OR NULL), count(status = 'error' OR NULL),
           count(status = 'cancelled' OR NULL), COALESCE(sum(prompt_tokens), 0), COALESCE(sum(completion_tokens), 0),
           count(latency_ms)
    FROM exchanges NOT INDEXED WHERE seq > ? AND day IS NOT NULL GROUP BY day, COALESCE(model, '')
    ON CONFLICT (day, model) DO UPDATE SET
        count = count + excluded.count, ok = ok + excluded.ok, error = error + excluded.error,
        cancelled = cancelled + excluded.cancelled, prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens, latencies = latencies + excluded.latencies
"""
_RECORD_COLUMNS = (
    "e.seq, e.id, e.ts, e.endpoint, e.client, e.key_id, e.conversation_id, e.backend, e.model, e.prompt, e.system, "
    "e.options, e.response, e.prompt_chars, e.response_chars, e.status, e.error_code, e.error_message, "
    "e.done_reason, e.prompt_tokens, e.completion_tokens, e.queue_ms, e.ttft_ms, e.latency_ms"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_DAY_MS = 86_400_000
_BATCH = 2000  # records per transaction, at most
# Cursor: (window top, score, seq) packed big-endian: 24 bytes, 32 base64url characters. Every
# 32-character base64url string decodes to some cursor, so the documented pattern is the whole check.
_CURSOR = struct.Struct(">qdq")
CURSOR_PATTERN = "^[A-Za-z0-9_-]{32}$"
_CURSOR_RE = re.compile(CURSOR_PATTERN)
# What `q` may be: double quotes in pairs (JSON Schema's regex dialect reads this one as Python does).
PAIRED_QUOTES = '^[^"]*("[^"]*"[^"]*)*$'
PERCENTILES = (50, 90, 99)
RANK_WINDOW = 5000  # with `q`, matches ranked together (newest first)
_K1, _B, _TYPICAL_CHARS = 1.2, 0.75, 1000.0


class SqliteHistory:
    """HistoryStore on one SQLite file (WAL), shared with the conversations and with other workers.

    `keep_text=False` (MINIVAULT_LOG_PROMPTS=false) stores prompt, system and response as NULL, so
    no text reaches the file or the full-text index. `consume` queues (never blocks); `start()`
    starts the writer thread, `flush()` waits for it, `aclose()`/`close()` write what is queued and stop.
    A failed batch is kept (up to `max_pending` records) and retried with the next one.
    """

    def __init__(
        self,
        db_path: Path,
        keep_text: bool = True,
        *,
        linger: float = 0.05,
        max_pending: int = 100_000,
        busy_timeout_ms: int = 10_000,
    ) -> None:
        self.path = Path(db_path)
        self.keep_text = keep_text
        self.failing = False
        self.last_error: str | None = None
        self.records_written = 0
        self.records_dropped = 0
        self._linger = linger
        self._max_pending = max_pending
        self._busy_timeout_ms = busy_timeout_ms
        self._records: deque[ExchangeRecord] = deque()
        self._pending: list[tuple[Any, ...]] = []
        self._flush_requests: deque[threading.Event] = deque()
        self._wakeup = threading.Event()
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="minivault-history-writer", daemon=True)
        self._write_lock = threading.Lock()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._connect()
        _migrate(self._db)

    # -- writing ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def consume(self, record: ExchangeRecord) -> None:
        """Take a finished exchange (the generation service calls this on the event loop)."""
        self._records.append(record)
        if not self._wakeup.is_set():  # one wake-up per batch, not per record
            self._wakeup.set()

    def add_many(self, records: Iterable[ExchangeRecord]) -> int:
        """Insert the records not there yet (by id), in transactions of up to 2,000; returns how many were new."""
        new = 0
        batch: list[tuple[Any, ...]] = []
        for record in records:
            batch.append(self._row(record))
            if len(batch) >= _BATCH * 10:
                new += self._insert(batch)
                batch = []
        if batch:
            new += self._insert(batch)
        return new

    def insert_rows(self, rows: list[tuple[Any, ...]]) -> int:
        """Insert rows already in column order (see `row_of`), in one transaction: bench/history.py fills
        a million-row database this way."""
        return self._insert(rows)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every record consumed before the call is written (or has failed)."""
        if not self._thread.is_alive():
            self._write_queued()
            return True
        done = threading.Event()
        self._flush_requests.append(done)
        self._wakeup.set()
        return done.wait(timeout)

    async def aclose(self) -> None:
        """Write everything queued so far, stop the writer thread and close the database."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Blocking `aclose` (the reindex command calls this)."""
        if self._thread.is_alive():
            self._stopping = True
            self._wakeup.set()
            self._thread.join()
        else:
            self._write_queued()
        with self._readers_lock:
            self._closed = True
            readers, self._all_readers = self._all_readers, []
        for reader in readers:
            reader.close()
        with self._write_lock:
            self._db.close()

    def _run(self) -> None:
        while True:
            self._wakeup.wait()
            if self._linger and not (self._stopping or self._flush_requests):
                # Gather a burst into one transaction: each commit costs FTS5 a segment to merge later.
                time.sleep(self._linger)
            self._wakeup.clear()
            answered = [self._flush_requests.popleft() for _ in range(len(self._flush_requests))]
            self._write_queued()
            for request in answered:
                request.set()
            if self._stopping and not self._records:
                break
        if self._pending:
            logger.error("history %s: %d exchanges could not be written", self.path, len(self._pending))

    def _write_queued(self) -> None:
        """Write every queued record, in transactions of up to _BATCH, keeping a failed batch for later."""
        records = self._records
        while records or self._pending:
            count = min(len(records), _BATCH)
            for _ in range(count):
                try:
                    self._pending.append(self._row(records.popleft()))
                except (TypeError, ValueError) as exc:  # a record orjson cannot encode: not worth a retry
                    logger.error("history %s: an exchange could not be stored (%s)", self.path, exc)
            excess = len(self._pending) - self._max_pending
            if excess > 0:
                self.records_dropped += excess
                del self._pending[:excess]
            try:
                self._insert(self._pending)
            except sqlite3.Error as exc:
                if not self.failing:
                    logger.error("history %s: write failed (%s); will retry with the next batch", self.path, exc)
                self.failing = True
                self.last_error = f"{type(exc).__name__}: {exc}"
                return
            if self.failing:
                logger.warning("history %s: writing again", self.path)
            self.failing = False
            self.last_error = None
            self.records_written += len(self._pending)
            self._pending = []

    def _insert(self, rows: list[tuple[Any, ...]]) -> int:
        with self._write_lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM exchanges").fetchone()[0]
                new = db.executemany(_INSERT, rows).rowcount
                if new:
                    db.execute(_INDEX_TEXT, (last,))
                    db.execute(_COUNT_DAYS, (last,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return new

    def _row(self, record: ExchangeRecord) -> tuple[Any, ...]:
        return row_of(record, self.keep_text)

    # -- reading ---------------------------------------------------------------------------------------

    async def search(self, query: HistoryQuery) -> HistoryPage:
        match = fts_query(query.q) if query.q is not None else None
        cursor = decode_cursor(query.cursor) if query.cursor else None
        return await self._read(lambda db: _search(db, query, match, cursor))

    async def get(self, exchange_id: str) -> ExchangeRecord | None:
        def read(db: sqlite3.Connection) -> ExchangeRecord | None:
            row = db.execute(f"SELECT {_RECORD_COLUMNS} FROM exchanges e WHERE e.id = ? ORDER BY e.seq DESC LIMIT 1",
                (exchange_id,),).fetchone()
            return _record(row) if row else None

        return await self._read(read)

    async def stats(self, since: datetime | None = None, until: datetime | None = None) -> list[dict[str, Any]]:
        return await self._read(lambda db: _stats(db, since, until))

    def read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` on a reader connection of this thread's choosing (blocking; `search` & co. call it off-loop)."""
        try:
            db = self._readers.get_nowait()
        except queue.Empty:
            db = self._connect(read_only=True)
            with self._readers_lock:
                if self._closed:
                    db.close()
                    raise sqlite3.ProgrammingError("the history database is closed") from None
                self._all_readers.append(db)
        try:
            return work(db)
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._readers.put(db)

    async def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self.read, work)

    def _connect(self, read_only: bool = False) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        if read_only:
            db.execute("PRAGMA query_only = ON")
            db.execute("PRAGMA mmap_size = 268435456")
        else:
            db.execute("PRAGMA journal_mode = WAL")
            # The log is the durable record; the history may lose its last batch to a power cut (reindex refills it).
            db.execute("PRAGMA synchronous = NORMAL")
        return db


def _migrate(db: sqlite3.Connection) -> None:
    """Create the tables on first use; PRAGMA user_version is the history schema's version."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the history database was made by a newer MiniVault (schema {version}, this one knows "
                f"{SCHEMA_VERSION}); use that version, or move the file away and run `minivault logs reindex`"
            )
        if version < SCHEMA_VERSION:
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def row_of(record: ExchangeRecord, keep_text: bool = True) -> tuple[Any, ...]:
    """The record as an `exchanges` row, in _COLUMNS order."""
    t_ms, day = _time_of(record.ts)
    error = record.error
    options = record.options
    return (
        record.id, record.ts, t_ms, day, record.endpoint, record.client, record.key_id, record.conversation_id,
        record.backend, record.model,
        record.prompt if keep_text else None,
        record.system if keep_text else None,
        orjson.dumps(options).decode() if options is not None else None,
        record.response if keep_text else None,
        record.prompt_chars, record.response_chars, record.status,
        error.code if error is not None else None,
        error.message if error is not None else None,
        record.done_reason, record.prompt_tokens, record.completion_tokens,
        record.queue_ms, record.ttft_ms, record.latency_ms,
    )  # fmt: skip


def _time_of(ts: str) -> tuple[int | None, str | None]:
    """Unix milliseconds and UTC day of a record's `ts`; (None, None) when it is not an ISO time."""
    try:
        moment = datetime.fromisoformat(ts)
    except ValueError:
        return None, None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ms = (moment - _EPOCH) // _MS
    return ms, moment.astimezone(UTC).date().isoformat()


def epoch_ms(moment: datetime) -> int:
    """A bound for `t_ms`, rounded up to the millisecond (naive times are UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    whole, rest = divmod(moment - _EPOCH, _MS)
    return whole + (1 if rest else 0)


def _record(row: tuple[Any, ...]) -> ExchangeRecord:
    (_, id_, ts, endpoint, client, key_id, conversation_id, backend, model, prompt, system, options, response,
     prompt_chars, response_chars, status, error_code, error_message, done_reason, prompt_tokens,
     completion_tokens, queue_ms, ttft_ms, latency_ms) = row[:24]  # fmt: skip
    return ExchangeRecord(
        id=id_, ts=ts, endpoint=endpoint, client=client, key_id=key_id, conversation_id=conversation_id,
        backend=backend, model=model, prompt=prompt, system=system,
        options=orjson.loads(options) if options is not None else None,
        response=response, prompt_chars=prompt_chars, response_chars=response_chars, status=status,
        error=LoggedError(error_code, error_message or "") if error_code is not None else None,
        done_reason=done_reason, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        queue_ms=queue_ms, ttft_ms=ttft_ms, latency_ms=latency_ms,
    )  # fmt: skip


# -- queries ---------------------------------------------------------------------------------------------


def fts_query(q: str) -> str | None:
    """The user's words as an FTS5 query: every word must appear (any order), `pre*` matches words that
    start with `pre`, and "two words" between double quotes must appear together, in that order.

    Each word and phrase is quoted for FTS5, so its operators (OR, NOT, NEAR, column filters) are
    plain words here and no input is an FTS5 syntax error; an unpaired double quote is the one
    mistake, reported as a 422. None when `q` holds no word at all (no search).
    """
    q = q.replace("\x00", " ")
    if q.count('"') % 2:
        raise InvalidRequest(
            'q: has an unpaired double quote; a phrase goes between two quotes, like "black hole" (or leave quotes out)'
        )
    terms = []
    for index, segment in enumerate(q.split('"')):
        if index % 2:  # between quotes: one phrase, a prefix when a `*` follows the closing quote
            if segment.strip():
                terms.append(f'"{segment}"')
            continue
        if index and segment.startswith("*") and terms and terms[-1].endswith('"'):
            terms[-1] += "*"
            segment = segment[1:]
        for word in segment.split():
            prefix = word.endswith("*")
            word = word.rstrip("*")
            if word:
                terms.append(f'"{word}"*' if prefix else f'"{word}"')
    return " ".join(terms) or None


def encode_cursor(window: int, score: float, seq: int) -> str:
    """The next page starts after `seq` (with `q`: after (score, seq) in the window of matches up to `window`)."""
    return base64.urlsafe_b64encode(_CURSOR.pack(window, score, seq)).decode()


def decode_cursor(cursor: str) -> tuple[int, float, int]:
    """(window, score, seq) from a cursor; InvalidRequest when it is not one this API gave out."""
    try:
        if not _CURSOR_RE.fullmatch(cursor):
            raise ValueError
        return _CURSOR.unpack(base64.urlsafe_b64decode(cursor.encode("ascii")))  # type: ignore[return-value]
    except (ValueError, binascii.Error, struct.error, UnicodeEncodeError):
        raise InvalidRequest("cursor: is not a cursor from GET /history; pass `next_cursor` back as it came") from None


def _filters(query: HistoryQuery) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("model", query.model), ("status", query.status), ("endpoint", query.endpoint)):
        if value is not None:
            where.append(f"e.{column} = ?")
            params.append(value)
    if query.since is not None:
        where.append("e.t_ms >= ?")
        params.append(epoch_ms(query.since))
    if query.until is not None:
        where.append("e.t_ms < ?")
        params.append(epoch_ms(query.until))
    return where, params


def _search(db: sqlite3.Connection, query: HistoryQuery, match: str | None, cursor: tuple[int, float, int] | None
            ) -> HistoryPage:  # fmt: skip
    where, params = _filters(query)
    limit = query.limit
    if match is not None:
        return _ranked(db, match, where, params, limit, cursor)
    if cursor is not None:
        where.append("e.seq < ?")
        params.append(cursor[2])
    sql = f"SELECT {_RECORD_COLUMNS} FROM exchanges e {_where(where)} ORDER BY e.seq DESC LIMIT ?"
    rows = db.execute(sql, (*params, limit + 1)).fetchall()
    more = len(rows) > limit
    return HistoryPage([_record(row) for row in rows[:limit]],
                       encode_cursor(0, 0.0, rows[limit - 1][0]) if more else None)  # fmt: skip


def _ranked(db: sqlite3.Connection, match: str, where: list[str], params: list[Any], limit: int,
            cursor: tuple[int, float, int] | None) -> HistoryPage:  # fmt: skip
    """Best match first, within windows of RANK_WINDOW matches: the newest window, then the next older one...

    The score depends on the exchange alone (see `_score`), never on the rest of the history, so a page
    computed later orders the same exchanges the same way, and the cursor (window, score, seq) resumes
    exactly where the previous page stopped. Windows bound the work of a query matching most of the
    history; below RANK_WINDOW matches the ranking is over all of them.
    """
    if cursor is None:
        top = db.execute("SELECT COALESCE(MAX(seq), 0) FROM exchanges").fetchone()[0]
        after: tuple[float, int] | None = None
    else:
        top, score, seq = cursor
        after = (score, seq)
    # Each highlight() marker is one more character: their count is the number of matched words and phrases.
    sql = (
        "SELECT t.rowid, "
        "COALESCE(length(highlight(exchanges_text, 0, char(1), '')) - length(e.prompt), 0) "
        "+ COALESCE(length(highlight(exchanges_text, 1, char(1), '')) - length(e.response), 0), "
        "COALESCE(length(e.prompt), 0) + COALESCE(length(e.response), 0) "
        "FROM exchanges_text t JOIN exchanges e ON e.seq = t.rowid "
        f"WHERE exchanges_text MATCH ? AND t.rowid <= ? {''.join(' AND ' + c for c in where)} "
        "ORDER BY t.rowid DESC LIMIT ?"
    )
    chosen: list[tuple[int, float, int]] = []  # (seq, score, top of its window)
    while len(chosen) <= limit and top > 0:
        try:
            rows = db.execute(sql, (match, top, *params, RANK_WINDOW)).fetchall()
        except sqlite3.OperationalError as exc:  # fts_query quotes every word, so this is not expected
            raise InvalidRequest(f"q: cannot be searched ({exc})") from None
        ranked = sorted(((_score(hits, chars), seq) for seq, hits, chars in rows), reverse=True)
        if after is not None:
            ranked = [item for item in ranked if item < after]
            after = None
        chosen += [(seq, score, top) for score, seq in ranked[: limit + 1 - len(chosen)]]
        if len(rows) < RANK_WINDOW:
            break
        top = rows[-1][0] - 1
    page = chosen[:limit]
    found = {row[0]: row for row in db.execute(
        f"SELECT {_RECORD_COLUMNS} FROM exchanges e WHERE e.seq IN ({', '.join('?' * len(page))})",
        [seq for seq, _, _ in page],
    )} if page else {}  # fmt: skip
    next_cursor = None
    if len(chosen) > limit:
        seq, score, window = page[-1]
        next_cursor = encode_cursor(window, score, seq)
    return HistoryPage([_record(found[seq]) for seq, _, _ in page], next_cursor)


def _score(hits: int, chars: int) -> float:
    """bm25's shape without its corpus-wide parts: more matches score higher, with diminishing returns
    (k1 = 1.2), and a long exchange needs more of them (b = 0.75 against a typical 1,000 characters).
    bm25 proper weighs words by their rarity across the history, which changes with every exchange
    written: a cursor could then skip or repeat exchanges whose scores crossed between two pages."""
    return hits * (_K1 + 1) / (hits + _K1 * (1 - _B + _B * chars / _TYPICAL_CHARS))


def _where(conditions: list[str]) -> str:
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


def _stats(db: sqlite3.Connection, since: datetime | None, until: datetime | None) -> list[dict[str, Any]]:
    """Whole days come from `exchange_days` and the latency index; the partial days at either end of
    since..until are summed from their rows."""
    low = epoch_ms(since) if since is not None else None
    high = epoch_ms(until) if until is not None else None
    if low is not None and high is not None and low >= high:
        return []
    # Whole days: [first_day, end_day) in day numbers since the epoch.
    first_day = -(-low // _DAY_MS) if low is not None else None
    end_day = high // _DAY_MS if high is not None else None
    groups: dict[tuple[str, str | None], dict[str, Any]] = {}
    db.execute("BEGIN")  # one snapshot for the counts and the percentiles
    try:
        if first_day is None or end_day is None or first_day < end_day:
            conditions, params = [], []
            if first_day is not None:
                conditions.append("day >= ?")
                params.append(_day_name(first_day))
            if end_day is not None:
                conditions.append("day < ?")
                params.append(_day_name(end_day))
            rows = db.execute(
                "SELECT day, model, count, ok, error, cancelled, prompt_tokens, completion_tokens, latencies "
                f"FROM exchange_days {_where(conditions)}",
                params,
            ).fetchall()
            for day, model, count, ok, error, cancelled, prompt_tokens, completion_tokens, latencies in rows:
                model = model or None
                groups[(day, model)] = {
                    "day": day, "model": model, "count": count, "ok": ok, "error": error, "cancelled": cancelled,
                    "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "latency_ms": _indexed_percentiles(db, day, model, latencies),
                }  # fmt: skip
        for start, end in _partial_ranges(low, high, first_day, end_day):
            _add_partial(db, groups, start, end)
    finally:
        db.execute("COMMIT")
    return [groups[key] for key in sorted(groups, key=lambda key: (key[0], key[1] or ""))]


def _day_name(day_number: int) -> str:
    return (_EPOCH + timedelta(days=day_number)).date().isoformat()


def _partial_ranges(
    low: int | None, high: int | None, first_day: int | None, end_day: int | None
) -> list[tuple[int, int]]:
    """The millisecond ranges of since..until that do not cover a whole day."""
    if low is None and high is None:
        return []
    if low is not None and high is not None and (first_day is None or end_day is None or first_day >= end_day):
        # No whole day inside: the range, cut at midnights.
        ranges, start = [], low
        while start < high:
            end = min(high, (start // _DAY_MS + 1) * _DAY_MS)
            ranges.append((start, end))
            start = end
        return ranges
    ranges = []
    if low is not None and first_day is not None and low < first_day * _DAY_MS:
        ranges.append((low, first_day * _DAY_MS))
    if high is not None and end_day is not None and end_day * _DAY_MS < high:
        ranges.append((end_day * _DAY_MS, high))
    return ranges


def _add_partial(db: sqlite3.Connection, groups: dict[tuple[str, str | None], dict[str, Any]], start: int, end: int
                 ) -> None:  # fmt: skip
    """Sum the rows of [start, end) (within one UTC day) into `groups`."""
    latencies: dict[tuple[str, str | None], list[float]] = {}
    rows = db.execute(
        "SELECT day, model, status, prompt_tokens, completion_tokens, latency_ms FROM exchanges "
        "WHERE t_ms >= ? AND t_ms < ?",
        (start, end),
    )
    for day, model, status, prompt_tokens, completion_tokens, latency_ms in rows:
        group = groups.get((day, model))
        if group is None:
            group = groups[(day, model)] = {
                "day": day, "model": model, "count": 0, "ok": 0, "error": 0, "cancelled": 0,
                "prompt_tokens": 0, "completion_tokens": 0, "latency_ms": None,
            }  # fmt: skip
        group["count"] += 1
        group[status] = group.get(status, 0) + 1
        group["prompt_tokens"] += prompt_tokens or 0
        group["completion_tokens"] += completion_tokens or 0
        if latency_ms is not None:
            latencies.setdefault((day, model), []).append(latency_ms)
    for key, values in latencies.items():
        values.sort()
        groups[key]["latency_ms"] = {f"p{p}": values[_rank(p, len(values))] for p in PERCENTILES}


def _rank(percentile: int, count: int) -> int:
    """Nearest-rank percentile: the 0-based position of the p-th percentile among `count` sorted values."""
    return max(0, math.ceil(percentile * count / 100) - 1)


def _indexed_percentiles(db: sqlite3.Connection, day: str, model: str | None, count: int) -> dict[str, float] | None:
    """p50/p90/p99 of one day and model, read off the (day, model, latency_ms) index: the high ones are
    counted from the top, so each costs at most half the day's entries and p99 a hundredth."""
    if not count:
        return None
    result = {}
    for p in PERCENTILES:
        position = _rank(p, count)
        if position < count // 2:
            order, offset = "ASC", position
        else:
            order, offset = "DESC", count - 1 - position
        row = db.execute(
            "SELECT latency_ms FROM exchanges INDEXED BY exchanges_by_latency "
            f"WHERE day = ? AND model IS ? AND latency_ms IS NOT NULL ORDER BY latency_ms {order} LIMIT 1 OFFSET ?",
            (day, model, offset),
        ).fetchone()
        result[f"p{p}"] = row[0] if row else None
    return result
