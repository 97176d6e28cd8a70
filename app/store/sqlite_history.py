"""The exchange history in SQLite: every finished exchange, searchable (FTS5), paged, and summed per day.

Writes never touch the event loop: `consume` only queues the row, and one writer thread inserts what
has gathered (for up to `linger` seconds) in one transaction; the full-text index and the per-day
tables are updated by one statement each per batch, which keeps FTS5 fast. Reads run in the store's
own few threads (MINIVAULT_HISTORY_READERS), each on a connection of its own, so that expensive searches
queue behind each other and never take the threads conversations and the rest of the app run on; WAL
mode lets them read while the writer writes, in this process or another worker's. A search is stopped
past MINIVAULT_HISTORY_QUERY_SECONDS (a progress handler interrupts SQLite), and `q` is bounded in words
and prefix length before it reaches FTS5 (`SearchBudget`).

Listing is newest first (start time, then id) and searching best match first (`_ranked`); a cursor
pins the page to the exchanges there when page one was read, so pages never repeat or skip one.
Per-day counts, token sums and latency buckets are kept per day, model and key as rows arrive, so stats
never scan exchanges (except the partial days at the ends of since..until), for one key or all of them.

`logs/log.jsonl` stays the source of truth: `minivault logs reindex` refills this database from it
through `add_many`, which works without the writer thread and skips exchanges already there. The
record's columns, and how each is written and read back, are app/store/columns.py's (PostgreSQL's too).
"""

import asyncio
import base64
import binascii
import logging
import math
import os
import queue
import re
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from app.errors import InvalidRequest, QueryTooExpensive
from app.exchanges.batch_writer import BatchWriter
from app.schemas import ExchangeRecord
from app.store.base import HistoryPage, HistoryQuery
from app.store.columns import LOG_STEP, SQLITE, ts_text

if TYPE_CHECKING:
    from app.config import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 3
# Schema 1 was a development version (commit 7560f2c): its tables are dropped and made again, and
# `minivault logs reindex` refills them from the log.
_DROP_V1 = [f"DROP TABLE IF EXISTS {table}" for table in ("exchanges_text", "exchange_days", "exchanges")]
# Schema 2 summed days per model only; schema 3 per model and key (an ordinary key's stats are its own):
# the two summary tables are made again and refilled from the exchanges (`_COUNT_DAYS` from seq 0).
_DROP_V2 = ["DROP TABLE IF EXISTS exchange_days", "DROP TABLE IF EXISTS exchange_latencies"]
# Plain statements (no executescript: it would commit the migration's transaction half-way).
_SCHEMA = [
    f"""CREATE TABLE IF NOT EXISTS exchanges (
        seq INTEGER PRIMARY KEY,
        {", ".join(column.sqlite_declaration() for column in SQLITE.columns)}
    )""",
    # An exchange is its start time and id: clients may choose ids (X-Request-ID, websocket `id`) and reuse
    # them, and a second exchange under an old id is not a duplicate; a line read twice (reindex) is.
    # Start times grow (nearly) with every insert, so this index is appended to, not written all over;
    # it also serves since/until (`ts` is stored as UTC "YYYY-MM-DDTHH:MM:SS.mmmZ", which sorts as text).
    "CREATE UNIQUE INDEX IF NOT EXISTS exchanges_by_start ON exchanges (ts, id)",
    "CREATE INDEX IF NOT EXISTS exchanges_by_model ON exchanges (model, ts)",
    "CREATE INDEX IF NOT EXISTS exchanges_by_status ON exchanges (status, ts)",
    # An ordinary key's listing, newest first (key_id = ? ORDER BY ts DESC, id DESC walks it), and the partial
    # days of its stats. Each key's start times grow, so inserts land at the end of a few ranges.
    "CREATE INDEX IF NOT EXISTS exchanges_by_key ON exchanges (key_id, ts, id)",
    # External content: the texts live once, in `exchanges`; the index holds only the words (and no
    # per-row sizes: those serve bm25, which the ranking does not use, see `_score`). It indexes the
    # id too, for GET /history/{id}: ids are random, and a B-tree index on them would take a page write per
    # insert (half the writer's time), where FTS5 gathers new entries into segments it merges later.
    """CREATE VIRTUAL TABLE IF NOT EXISTS exchanges_text USING fts5 (
        prompt, response, id, content = 'exchanges', content_rowid = 'seq', columnsize = 0,
        tokenize = 'unicode61 remove_diacritics 2'
    )""",
    # Up to 8 segments per level before FTS5 merges them (4 by default): a third less indexing work per
    # exchange, for a little more reading per search.
    "INSERT INTO exchanges_text (exchanges_text, rank) VALUES ('automerge', 8)",
    # One row per UTC day, model and key ('' for none), kept up to date by every insert: /history/stats reads
    # these (summed over keys for an admin key; key_id last, so that sum reads them in (day, model) order).
    """CREATE TABLE IF NOT EXISTS exchange_days (
        day TEXT NOT NULL,
        model TEXT NOT NULL,
        key_id TEXT NOT NULL,
        count INTEGER NOT NULL,
        ok INTEGER NOT NULL,
        error INTEGER NOT NULL,
        cancelled INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        PRIMARY KEY (day, model, key_id)
    ) WITHOUT ROWID""",
    # Latencies per day, model and key in 2% wide buckets (bucket b holds 1.02**b <= ms < 1.02**(b+1)): the
    # percentiles of any number of exchanges from a few hundred rows, within 1%.
    """CREATE TABLE IF NOT EXISTS exchange_latencies (
        day TEXT NOT NULL,
        model TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (day, model, bucket, key_id)
    ) WITHOUT ROWID""",
]
_COLUMNS = ", ".join(SQLITE.names)
# Rows go in chunks of about 30, one statement each: SQLite then works without the GIL for the whole chunk,
# where executemany() would take the GIL back for every row (and the event loop would wait for it). A chunk
# stays under 999 parameters, the limit of SQLite before 3.32.
_CHUNKS = (999 // len(SQLITE.names), 8, 1)
_INSERTS = {
    size: f"INSERT OR IGNORE INTO exchanges ({_COLUMNS}) VALUES "
    + ", ".join([f"({', '.join('?' * len(SQLITE.names))})"] * size)
    for size in _CHUNKS
}
# Run once per batch over the rows the batch added (seq > the largest before it); NOT INDEXED keeps the
# planner on that rowid range (an index that orders the GROUP BY could tempt it into a full scan).
_INDEX_TEXT = (
    "INSERT INTO exchanges_text (rowid, prompt, response, id) SELECT seq, prompt, response, id "
    "FROM exchanges NOT INDEXED WHERE seq > ?"
)
_COUNT_DAYS = """
    INSERT INTO exchange_days (day, model, key_id, count, ok, error, cancelled, prompt_tokens, completion_tokens)
    SELECT day, COALESCE(model, ''), COALESCE(key_id, ''), count(*), count(status = 'ok' OR NULL),
           count(status = 'error' OR NULL), count(status = 'cancelled' OR NULL), COALESCE(sum(prompt_tokens), 0),
           COALESCE(sum(completion_tokens), 0)
    FROM exchanges NOT INDEXED WHERE seq > ? AND day IS NOT NULL
    GROUP BY day, COALESCE(model, ''), COALESCE(key_id, '')
    ON CONFLICT (day, model, key_id) DO UPDATE SET
        count = count + excluded.count, ok = ok + excluded.ok, error = error + excluded.error,
        cancelled = cancelled + excluded.cancelled, prompt_tokens = prompt_tokens + excluded.prompt_tokens,
        completion_tokens = completion_tokens + excluded.completion_tokens
"""
_COUNT_LATENCIES = """
    INSERT INTO exchange_latencies (day, model, bucket, key_id, count)
    SELECT day, COALESCE(model, ''), latency_bucket, COALESCE(key_id, ''), count(*) FROM exchanges NOT INDEXED
    WHERE seq > ? AND day IS NOT NULL AND latency_bucket IS NOT NULL
    GROUP BY day, COALESCE(model, ''), latency_bucket, COALESCE(key_id, '')
    ON CONFLICT (day, model, bucket, key_id) DO UPDATE SET count = count + excluded.count
"""
# The cursor's seq, then the record's columns (`_record`).
_RECORD_COLUMNS = "e.seq, " + ", ".join(f"e.{name}" for name in SQLITE.names)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_DAY_MS = 86_400_000
_READ_FLUSH_TIMEOUT = 5.0
# Cursor: (snapshot or window top, score, seq) packed big-endian: 24 bytes, 32 base64url characters. Every
# 32-character base64url string decodes to some cursor, so the documented pattern is the whole check.
_CURSOR = struct.Struct(">qdq")
CURSOR_PATTERN = "^[A-Za-z0-9_-]{32}$"
_CURSOR_RE = re.compile(CURSOR_PATTERN)
# What `q` may be: double quotes in pairs (JSON Schema's regex dialect reads this one as Python does).
PAIRED_QUOTES = '^[^"]*("[^"]*"[^"]*)*$'
PERCENTILES = (50, 90, 99)
_WORD = re.compile(r"[^\W_]")  # a character FTS5's tokenizer keeps
RANK_WINDOW = 5000  # with `q`, matches ranked together (newest first)
_K1, _B, _TYPICAL_CHARS = 1.2, 0.75, 1000.0
_TOKEN = re.compile(r"[^\W_]+")  # a word as FTS5's tokenizer cuts it (at punctuation too: "foo.ab" is two)
# SQLite calls the deadline's check every this many virtual-machine steps: about every 20 ms of the worst
# searches (FTS5's prefix merges are long steps), and a negligible cost (microseconds) for ordinary ones.
_PROGRESS_STEPS = 1000


@dataclass(frozen=True, slots=True)
class SearchBudget:
    """What one history search may cost (MINIVAULT_HISTORY_MAX_TERMS, _MIN_PREFIX, _QUERY_SECONDS)."""

    max_terms: int = 16
    min_prefix: int = 3
    seconds: float = 1.0

    @classmethod
    def of(cls, settings: "Settings") -> "SearchBudget":
        return cls(settings.history_max_terms, settings.history_min_prefix, settings.history_query_seconds)

    def too_expensive(self) -> QueryTooExpensive:
        """The error of a search stopped at the deadline."""
        return QueryTooExpensive(
            f"q: the search ran past {self.seconds:g} s (MINIVAULT_HISTORY_QUERY_SECONDS) and was stopped; narrow it: "
            "fewer words, longer prefixes, or a `model`, `status`, `since` or `until` filter"
        )


class _Deadline:
    """SQLite's progress handler: non-zero past the deadline, which interrupts the statement."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.passed = False

    def __call__(self) -> int:
        if time.monotonic() < self.at:
            return 0
        self.passed = True
        return 1


class HistoryUnavailable(Exception):
    """The database file cannot be opened or created; the message says which and why."""


class SqliteHistory(BatchWriter):
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
        linger: float = 0.5,
        max_pending: int = 100_000,
        busy_timeout_ms: int = 10_000,
        readers: int = 2,
        budget: SearchBudget | None = None,
    ) -> None:
        self.path = Path(db_path)
        super().__init__(str(self.path), keep_text, linger, max_pending, "minivault-history-writer")
        self._busy_timeout_ms = busy_timeout_ms
        self.budget = budget or SearchBudget()
        # History reads' own threads: a burst of searches waits here, not in the default pool that
        # conversations (and every other asyncio.to_thread) share.
        self._executor = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="minivault-history-reader")
        self._closed = False
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Readable by its owner only, like the log it mirrors; SQLite gives -wal and -shm the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = self._connect()
        except (OSError, sqlite3.Error) as exc:
            self._executor.shutdown()
            raise HistoryUnavailable(
                f"cannot open the history database {self.path} ({exc}); set MINIVAULT_DB_PATH to a writable file"
            ) from exc
        try:
            _migrate(self._db)
        except BaseException:
            self._db.close()
            self._executor.shutdown()
            raise

    # -- writing ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def insert_rows(self, rows: list[tuple[Any, ...]]) -> int:
        """Insert rows already in column order (see `row_of`), in one transaction: bench/history.py fills
        a million-row database this way."""
        return self._insert(rows)

    async def aclose(self) -> None:
        """Write everything queued so far, stop the writer thread and close the database."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Blocking `aclose` (the reindex command calls this)."""
        # Reads under way finish first (each within its budget; they may wait for the writer), queued ones are
        # dropped; then the writer writes what is left and stops.
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._stop_writer()
        with self._readers_lock:
            self._closed = True
            readers, self._all_readers = self._all_readers, []
        for reader in readers:
            reader.close()
        with self._write_lock:
            self._db.close()

    def _row(self, record: ExchangeRecord) -> tuple[Any, ...]:
        return SQLITE.row(record, self.keep_text)

    def _row_bytes(self, row: tuple[Any, ...]) -> int:
        return SQLITE.row_bytes(row)

    def _insert(self, rows: list[tuple[Any, ...]]) -> int:
        with self._write_lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM exchanges").fetchone()[0]
                new = self._insert_rows(db, rows)
                if new:
                    db.execute(_INDEX_TEXT, (last,))
                    db.execute(_COUNT_DAYS, (last,))
                    db.execute(_COUNT_LATENCIES, (last,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return new

    def _insert_rows(self, db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
        new = start = 0
        for size in _CHUNKS:
            sql = _INSERTS[size]
            while len(rows) - start >= size:
                chunk = rows[start : start + size]
                start += size
                try:
                    new += db.execute(sql, list(chain.from_iterable(chunk))).rowcount
                except (OverflowError, sqlite3.InterfaceError):  # a value SQLite cannot hold: skip its row only
                    new += self._insert_one_by_one(db, chunk)
        return new

    def _insert_one_by_one(self, db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
        new = 0
        for row in rows:
            try:
                new += db.execute(_INSERTS[1], row).rowcount
            except (OverflowError, sqlite3.InterfaceError) as exc:
                logger.error("history %s: exchange %s cannot be stored (%s)", self.path, row[0], exc)
        return new

    # -- reading ---------------------------------------------------------------------------------------

    async def search(self, query: HistoryQuery) -> HistoryPage:
        """A page of `query`; InvalidRequest when `q` is over the budget's words or prefixes, QueryTooExpensive
        when the search runs past its seconds."""
        match = fts_query(query.q, self.budget) if query.q is not None else None
        cursor = decode_cursor(query.cursor) if query.cursor else None
        budget = self.budget

        def read(db: sqlite3.Connection) -> HistoryPage:
            # The deadline starts when the search does: not while it queued for a reader thread, nor while
            # this process's unwritten records were written (a busy writer is no reason to refuse a search).
            deadline = _Deadline(budget.seconds)
            db.set_progress_handler(deadline, _PROGRESS_STEPS)
            try:
                return _search(db, query, match, cursor)
            except sqlite3.OperationalError:
                if deadline.passed:
                    raise budget.too_expensive() from None
                raise
            finally:
                db.set_progress_handler(None, 0)

        return await self._read(read)

    async def get(self, exchange_id: str, key_id: str | None = None) -> ExchangeRecord | None:
        owned = " AND e.key_id = ?" if key_id is not None else ""
        mine = (key_id,) if key_id is not None else ()

        def read(db: sqlite3.Connection) -> ExchangeRecord | None:
            # The id as a phrase finds the candidates (FTS5 folds case and splits at punctuation); `=` picks it.
            if _WORD.search(exchange_id):
                sql = (f"SELECT {_RECORD_COLUMNS} FROM exchanges e WHERE e.seq IN (SELECT rowid FROM exchanges_text "
                       f"WHERE exchanges_text MATCH ?) AND e.id = ?{owned} ORDER BY e.seq DESC LIMIT 1")  # fmt: skip
                phrase = exchange_id.replace('"', '""')
                row = db.execute(sql, (f'id : "{phrase}"', exchange_id, *mine)).fetchone()
            else:  # an id of punctuation only has no words to look up: read the table through
                sql = f"SELECT {_RECORD_COLUMNS} FROM exchanges e WHERE e.id = ?{owned} ORDER BY e.seq DESC LIMIT 1"
                row = db.execute(sql, (exchange_id, *mine)).fetchone()
            return _record(row) if row else None

        return await self._read(read)

    async def stats(
        self, since: datetime | None = None, until: datetime | None = None, key_id: str | None = None
    ) -> list[dict[str, Any]]:
        return await self._read(lambda db: _stats(db, since, until, key_id))

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
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._read_own_writes, work)

    def _read_own_writes(self, work: Callable[[sqlite3.Connection], T]) -> T:
        # What this process has consumed is written first, so an answer just given is in the history
        # (rather than up to `linger` later); reads are rare next to writes, so batches stay large.
        if self._records or self._pending:
            self.flush(_READ_FLUSH_TIMEOUT)
        return self.read(work)

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
            db.execute("PRAGMA journal_size_limit = 67108864")  # the WAL shrinks back to 64 MB after a checkpoint
        return db


def _migrate(db: sqlite3.Connection) -> None:
    """Create the tables on first use, and add the columns an older MiniVault's table lacks; PRAGMA user_version
    is the history schema's version (what cannot be added column by column)."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise HistoryUnavailable(f"cannot write to the history database ({exc})") from exc
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryUnavailable(
                f"the history database was made by a newer MiniVault (schema {version}, this one knows "
                f"{SCHEMA_VERSION}); use that version, or move the file away and run `minivault logs reindex`"
            )
        if version == 1:
            logger.warning("history: the database has a development schema; emptied it (`minivault logs reindex` "
                           "refills it from the log)")  # fmt: skip
            for statement in _DROP_V1:
                db.execute(statement)
        if version == 2:
            for statement in _DROP_V2:
                db.execute(statement)
        if version < SCHEMA_VERSION:
            for statement in _SCHEMA:
                db.execute(statement)
            if version == 2:  # the day tables again, now per key, from the exchanges already there
                db.execute(_COUNT_DAYS, (0,))
                db.execute(_COUNT_LATENCIES, (0,))
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        present = [row[1] for row in db.execute("PRAGMA table_info(exchanges)")]
        for column in SQLITE.missing(present):
            # Nullable, with no default: SQLite changes only the table's definition, not its rows.
            db.execute(f"ALTER TABLE exchanges ADD COLUMN {column.sqlite_declaration()}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def row_of(record: ExchangeRecord, keep_text: bool = True) -> tuple[Any, ...]:
    """The record as an `exchanges` row, in _COLUMNS order (app/store/columns.py)."""
    return SQLITE.row(record, keep_text)


def epoch_ms(moment: datetime) -> int:
    """A bound on start times in Unix milliseconds, rounded up (naive times are UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    whole, rest = divmod(moment - _EPOCH, _MS)
    return whole + (1 if rest else 0)


def _ms_text(ms: int) -> str:
    """Unix milliseconds as a stored `ts`, for comparing with it (beyond the years 1-9999: a text before
    or after every `ts`)."""
    try:
        return ts_text(_EPOCH + timedelta(milliseconds=ms))
    except OverflowError:
        return "" if ms < 0 else "\uffff"


def _record(row: tuple[Any, ...]) -> ExchangeRecord:
    """The record of a row read with _RECORD_COLUMNS."""
    return SQLITE.record(row[1:])


# -- queries ---------------------------------------------------------------------------------------------


def search_terms(q: str, budget: SearchBudget | None = None) -> list[tuple[str, bool]]:
    """The user's words as (text, prefix) terms, the same for SQLite and PostgreSQL: every word must appear
    (any order), `pre*` matches words that start with `pre`, and "two words" between double quotes must
    appear together, in that order (a `*` after the closing quote makes the last of them a prefix).

    An unpaired double quote is a 422, and so is a `q` over `budget`: more words than `max_terms` (a
    phrase counts each of its words), or a prefix shorter than `min_prefix`.
    """
    q = q.replace("\x00", " ")
    if q.count('"') % 2:
        raise InvalidRequest(
            'q: has an unpaired double quote; a phrase goes between two quotes, like "black hole" (or leave quotes out)'
        )
    terms: list[tuple[str, bool]] = []
    phrase = False  # the segment before was a phrase
    for index, segment in enumerate(q.split('"')):
        if index % 2:  # between quotes: one phrase, a prefix when a `*` follows the closing quote
            phrase = bool(segment.strip())
            if phrase:
                terms.append((segment, False))
            continue
        if phrase and segment.startswith("*"):
            terms[-1] = (terms[-1][0], True)
            segment = segment[1:]
        for word in segment.split():
            prefix = word.endswith("*")
            word = word.rstrip("*")
            if word:
                terms.append((word, prefix))
    if budget is not None:
        _check_budget(terms, budget)
    return terms


def _check_budget(terms: list[tuple[str, bool]], budget: SearchBudget) -> None:
    """A 422 naming the limit and its setting when `terms` would cost more than `budget` allows.

    Words are counted as the index cuts them (a phrase is as many lookups as it has words), and a
    prefix is its last word: each short prefix is a merge of every word it starts, across the history.
    """
    words = [_TOKEN.findall(text) for text, _ in terms]
    count = sum(len(tokens) for tokens in words)
    if count > budget.max_terms:
        raise InvalidRequest(
            f"q: has {count} words; a search may have at most {budget.max_terms} (MINIVAULT_HISTORY_MAX_TERMS): "
            "keep the few most telling ones"
        )
    for (_, prefix), tokens in zip(terms, words, strict=True):
        if prefix and tokens and len(tokens[-1]) < budget.min_prefix:
            raise InvalidRequest(
                f"q: the prefix {tokens[-1]}* is too short; a prefix needs at least {budget.min_prefix} characters "
                "before the `*` (MINIVAULT_HISTORY_MIN_PREFIX)"
            )


def fts_query(q: str, budget: SearchBudget | None = None) -> str | None:
    """`search_terms` as an FTS5 query over prompt and response; None when `q` holds no word (no search).

    Each word and phrase is quoted for FTS5, so its operators (OR, NOT, NEAR, column filters) are
    plain words here and no input is an FTS5 syntax error.
    """
    terms = [f'"{text}"*' if prefix else f'"{text}"' for text, prefix in search_terms(q, budget)]
    return f"{{prompt response}} : ({' '.join(terms)})" if terms else None


def encode_cursor(bound: int, score: float, seq: int) -> str:
    """The next page starts after exchange `seq`. Without `q`, `bound` is the newest seq when page one was
    read; with `q`, the top of the window `seq` is ranked in, and `score` its score there."""
    return base64.urlsafe_b64encode(_CURSOR.pack(bound, score, seq)).decode()


def decode_cursor(cursor: str) -> tuple[int, float, int]:
    """(bound, score, seq) from a cursor; InvalidRequest when it is not one this API gave out."""
    try:
        if not _CURSOR_RE.fullmatch(cursor):
            raise ValueError
        return _CURSOR.unpack(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (ValueError, binascii.Error, struct.error, UnicodeEncodeError):
        raise InvalidRequest("cursor: is not a cursor from GET /history; pass `next_cursor` back as it came") from None


def _filters(query: HistoryQuery) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("model", query.model), ("status", query.status), ("endpoint", query.endpoint),
                          ("key_id", query.key_id)):  # fmt: skip
        if value is not None:
            where.append(f"e.{column} = ?")
            params.append(value)
    if query.since is not None:
        where.append("e.ts >= ?")
        params.append(_ms_text(epoch_ms(query.since)))
    if query.until is not None:
        where.append("e.ts < ?")
        params.append(_ms_text(epoch_ms(query.until)))
    return where, params


def _search(db: sqlite3.Connection, query: HistoryQuery, match: str | None, cursor: tuple[int, float, int] | None
            ) -> HistoryPage:  # fmt: skip
    where, params = _filters(query)
    limit = query.limit
    if match is not None:
        return _ranked(db, match, where, params, limit, cursor)
    # Newest first by start time (then id), among the exchanges there when the first page was read
    # (seq <= snapshot): one walk down the (ts, id) index or a filter's, however wide since..until is.
    if cursor is None:
        snapshot = db.execute("SELECT COALESCE(MAX(seq), 0) FROM exchanges").fetchone()[0]
    else:
        snapshot, _, last = cursor
        previous = db.execute("SELECT ts, id FROM exchanges WHERE seq = ?", (last,)).fetchone()
        if previous is None:  # not a cursor this database gave out
            return HistoryPage([], None)
        where.append("(e.ts, e.id) < (?, ?)")
        params.extend(previous)
    where.append("e.seq <= ?")
    params.append(snapshot)
    sql = f"SELECT {_RECORD_COLUMNS} FROM exchanges e {_where(where)} ORDER BY e.ts DESC, e.id DESC LIMIT ?"
    rows = db.execute(sql, (*params, limit + 1)).fetchall()
    more = len(rows) > limit
    return HistoryPage([_record(row) for row in rows[:limit]],
                       encode_cursor(snapshot, 0.0, rows[limit - 1][0]) if more else None)  # fmt: skip


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
            if exc.sqlite_errorcode == sqlite3.SQLITE_INTERRUPT:  # the deadline (SqliteHistory.search)
                raise
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


def _stats(db: sqlite3.Connection, since: datetime | None, until: datetime | None, key_id: str | None = None
           ) -> list[dict[str, Any]]:  # fmt: skip
    """Whole days come from the per-day tables (one key's rows, or all keys' summed); the partial days at
    either end of since..until are summed from their exchanges (found through the start-time index)."""
    low = epoch_ms(since) if since is not None else None
    high = epoch_ms(until) if until is not None else None
    if low is not None and high is not None and low >= high:
        return []
    # Whole days: [first_day, end_day) in day numbers since the epoch.
    first_day = -(-low // _DAY_MS) if low is not None else None
    end_day = high // _DAY_MS if high is not None else None
    groups: dict[tuple[str, str | None], dict[str, Any]] = {}
    buckets: dict[tuple[str, str | None], dict[int, int]] = {}
    db.execute("BEGIN")  # one snapshot for the counts and the latencies
    try:
        if first_day is None or end_day is None or first_day < end_day:
            conditions, params = [], []
            if first_day is not None:
                conditions.append("day >= ?")
                params.append(_day_name(first_day))
            if end_day is not None:
                conditions.append("day < ?")
                params.append(_day_name(end_day))
            if key_id is not None:
                conditions.append("key_id = ?")
                params.append(key_id)
            days = db.execute(
                "SELECT day, model, sum(count), sum(ok), sum(error), sum(cancelled), sum(prompt_tokens), "
                f"sum(completion_tokens) FROM exchange_days {_where(conditions)} GROUP BY day, model",
                params,
            )
            for day, model, count, ok, error, cancelled, prompt_tokens, completion_tokens in days:
                groups[(day, model or None)] = {
                    "day": day, "model": model or None, "count": count, "ok": ok, "error": error,
                    "cancelled": cancelled, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                }  # fmt: skip
            latencies = db.execute(
                f"SELECT day, model, bucket, sum(count) FROM exchange_latencies {_where(conditions)} "
                "GROUP BY day, model, bucket",
                params,
            )
            for day, model, bucket, count in latencies:
                buckets.setdefault((day, model or None), {})[bucket] = count
        for start, end in _partial_ranges(low, high, first_day, end_day):
            _add_partial(db, groups, buckets, start, end, key_id)
    finally:
        db.execute("COMMIT")
    for key, group in groups.items():
        group["latency_ms"] = _percentiles(buckets.get(key))
    return [groups[key] for key in sorted(groups, key=lambda key: (key[0], key[1] or ""))]


def _day_name(day_number: int) -> str:
    return _ms_text(day_number * _DAY_MS)[:10]


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


def _add_partial(
    db: sqlite3.Connection,
    groups: dict[tuple[str, str | None], dict[str, Any]],
    buckets: dict[tuple[str, str | None], dict[int, int]],
    start: int,
    end: int,
    key_id: str | None = None,
) -> None:
    """Sum the exchanges that started in [start, end) (within one UTC day, of `key_id` when given) into
    `groups` and `buckets`."""
    mine = " AND key_id = ?" if key_id is not None else ""
    rows = db.execute(
        "SELECT day, model, status, prompt_tokens, completion_tokens, latency_bucket FROM exchanges "
        f"WHERE ts >= ? AND ts < ?{mine}",
        (_ms_text(start), _ms_text(end), *((key_id,) if key_id is not None else ())),
    )
    for day, model, status, prompt_tokens, completion_tokens, bucket in rows:
        key = (day, model)
        group = groups.get(key)
        if group is None:
            group = groups[key] = {
                "day": day, "model": model, "count": 0, "ok": 0, "error": 0, "cancelled": 0,
                "prompt_tokens": 0, "completion_tokens": 0,
            }  # fmt: skip
        group["count"] += 1
        group[status] = group.get(status, 0) + 1
        group["prompt_tokens"] += prompt_tokens or 0
        group["completion_tokens"] += completion_tokens or 0
        if bucket is not None:
            counts = buckets.setdefault(key, {})
            counts[bucket] = counts.get(bucket, 0) + 1


def _percentiles(buckets: dict[int, int] | None) -> dict[str, float] | None:
    """Nearest-rank p50/p90/p99 from bucket counts: the middle of the bucket holding the p-th value
    (within 1% of it); None when nothing was timed."""
    if not buckets:
        return None
    total = sum(buckets.values())
    result = {}
    ordered = sorted(buckets.items())
    index, seen = 0, ordered[0][1]
    for p in PERCENTILES:
        wanted = max(1, math.ceil(p * total / 100))
        while seen < wanted:
            index += 1
            seen += ordered[index][1]
        result[f"p{p}"] = round(math.exp((ordered[index][0] + 0.5) * LOG_STEP), 2)
    return result
