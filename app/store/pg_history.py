"""The exchange history in PostgreSQL, shared by replicas: SQLite's API, filters, cursors and order.

Writes never touch the event loop: `consume` only queues the row, and one writer thread inserts what has
gathered (for up to `linger` seconds) with one statement per batch. Each batch takes the table's SHARE ROW
EXCLUSIVE lock first, so the batches of all replicas commit one after another and `seq` grows in commit
order: a cursor pinned to `seq <= snapshot` then holds exactly the exchanges there when its first page was
read, on whichever replica serves the next page. Reads take connections from an asyncio pool of
MINIVAULT_HISTORY_READERS connections (searches queue there, apart from the conversations' pool), and a
search runs in a transaction whose `statement_timeout` is what is left of MINIVAULT_HISTORY_QUERY_SECONDS.

Search: a generated `tsvector` column (text search configuration `minivault_text`: `simple` words,
accents folded by `unaccent`) under a GIN index, ranked by ts_rank, which like SQLite's score depends on
the exchange alone. Stats are computed from the exchanges, with exact nearest-rank percentiles. The
record's columns are SQLite's (app/store/columns.py), without its latency buckets.
"""

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.errors import ProgramLimitExceeded, QueryCanceled
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from app.exchanges.batch_writer import BatchWriter
from app.schemas import ExchangeRecord
from app.store import sqlite_history
from app.store.base import HistoryPage, HistoryQuery
from app.store.columns import PG
from app.store.pg_schema import TEXT_CONFIG, PgUnavailable, connect, describe, migrate
from app.store.sqlite_history import (
    PERCENTILES,
    SearchBudget,
    decode_cursor,
    encode_cursor,
    epoch_ms,
    search_terms,
)

logger = logging.getLogger(__name__)

RANK_WINDOW = sqlite_history.RANK_WINDOW  # with `q`, matches ranked together (newest first), as in SQLite
_COLUMNS = PG.names
_TYPES = tuple(column.pg for column in PG.columns)
_TEXT_COLUMNS = [index for index, kind in enumerate(_TYPES) if kind == "text"]
_CONFLICT = "ON CONFLICT (ts, id) DO NOTHING"
# A batch is one statement: a column of values per parameter, whatever the number of rows.
_INSERT_BATCH = (
    f"INSERT INTO exchanges ({', '.join(_COLUMNS)}) "
    f"SELECT * FROM unnest({', '.join(f'%s::{kind}[]' for kind in _TYPES)}) {_CONFLICT}"
)
_INSERT_ONE = (
    f"INSERT INTO exchanges ({', '.join(_COLUMNS)}) VALUES ({', '.join(f'%s::{kind}' for kind in _TYPES)}) {_CONFLICT}"
)
_RECORD_COLUMNS = "e.seq, " + ", ".join(f"e.{column}" for column in _COLUMNS)
# A value PostgreSQL cannot hold (an integer past 64 bits, an over-long index entry, a lone surrogate):
# its row is skipped alone, as in SQLite.
_UNSTORABLE = (psycopg.DataError, ProgramLimitExceeded, UnicodeEncodeError)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_READ_FLUSH_TIMEOUT = 5.0
_AFTER_ALL = (math.inf, 2**63 - 1)  # a (score, seq) above every exchange's
# SQLite's length normalisation (b = 0.75 against a typical 1,000 characters) over ts_rank's term
# frequency: more matches rank higher, with diminishing returns, and a long exchange needs more of them.
_SCORE = "ts_rank(e.search, %s::tsquery)::float8 / (0.25::float8 + 0.75::float8 * e.text_chars / 1000.0::float8)"


class PgHistory(BatchWriter):
    """HistoryStore on PostgreSQL, shared by every replica (and `minivault logs reindex`, through `add_many`).

    `connect()` migrates the schema and opens the writer's connection (blocking: enough for `add_many`);
    `await open()` does that, opens the readers' pool and starts the writer thread. `keep_text=False`
    stores no text (MINIVAULT_LOG_PROMPTS=false). A failed batch is kept (up to `max_pending` records)
    and retried with the next one, on a new connection if the old one broke.
    """

    _write_errors = (psycopg.Error, PgUnavailable)  # the server is down, restarting, out of space...

    def __init__(
        self,
        conninfo: str,
        keep_text: bool = True,
        *,
        linger: float = 0.1,
        max_pending: int = 100_000,
        readers: int = 2,
        connect_timeout: float = 10.0,
        budget: SearchBudget | None = None,
    ) -> None:
        self.conninfo = conninfo
        super().__init__(describe(conninfo), keep_text, linger, max_pending, "minivault-pg-history-writer")
        self._readers_max = readers
        self.budget = budget or SearchBudget()
        # A read that first waits for this replica's unwritten records waits in the history's own threads,
        # not in the default pool that conversations share.
        self._executor = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="minivault-pg-history-reader")
        self._connect_timeout = connect_timeout
        self._db: psycopg.Connection | None = None
        self._readers: AsyncConnectionPool | None = None

    # -- opening and closing -----------------------------------------------------------------------------

    def connect(self) -> None:
        """Migrate the schema and open the writer's connection (blocking); PgUnavailable when impossible."""
        migrate(self.conninfo, self._connect_timeout)
        with self._write_lock:
            self._writer()

    async def open(self) -> None:
        """`connect`, then open the readers' pool and start the writer thread."""
        await asyncio.to_thread(self.connect)
        pool = AsyncConnectionPool(
            self.conninfo, min_size=1, max_size=self._readers_max, open=False, name="minivault-history",
            kwargs={"autocommit": True, "connect_timeout": max(1, round(self._connect_timeout)),
                    "application_name": "minivault"},
            # One round trip per read, so that a connection the server dropped (a restart, a fail-over)
            # is replaced before a read fails on it.
            check=AsyncConnectionPool.check_connection,
        )  # fmt: skip
        try:
            await pool.open(wait=True, timeout=self._connect_timeout)
        except PoolTimeout as exc:
            await pool.close()
            raise PgUnavailable(f"cannot connect to PostgreSQL at {self.where} ({exc})") from exc
        self._readers = pool
        self._thread.start()

    def close(self) -> None:
        """Write everything queued, stop the writer thread and close its connection (blocking)."""
        self._executor.shutdown(wait=True, cancel_futures=True)  # reads waiting for the writer end first
        self._stop_writer()
        with self._write_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
        if self._readers is not None:
            await self._readers.close()

    # -- writing -----------------------------------------------------------------------------------------

    def _row(self, record: ExchangeRecord) -> tuple[Any, ...]:
        return PG.row(record, self.keep_text)

    def _row_bytes(self, row: tuple[Any, ...]) -> int:
        return PG.row_bytes(row)

    def _writer(self) -> psycopg.Connection:
        """The writer's connection, made anew when there is none or the server dropped it (call under the lock)."""
        if self._db is not None and self._db.broken:
            self._db.close()
            self._db = None
        if self._db is None:
            self._db = connect(self.conninfo, self._connect_timeout, autocommit=True, application_name="minivault")
        return self._db

    def _insert(self, rows: list[tuple[Any, ...]]) -> int:
        if not rows:
            return 0
        with self._write_lock:
            try:
                return self._insert_on(self._writer(), rows)
            except psycopg.OperationalError:
                if self._db is None or not self._db.broken:
                    raise
                # The server dropped the connection (a restart, a fail-over, an idle timeout): once more on a
                # new one; rows already in from a commit whose answer was lost are skipped as duplicates.
                return self._insert_on(self._writer(), rows)

    def _insert_on(self, db: psycopg.Connection, rows: list[tuple[Any, ...]]) -> int:
        with db.transaction():
            # One writer at a time, every replica's included (reads go on): see the module docstring.
            db.execute("LOCK TABLE exchanges IN SHARE ROW EXCLUSIVE MODE")
            try:
                with db.transaction():  # a savepoint: a refused batch is retried row by row
                    return db.execute(_INSERT_BATCH, _as_columns(rows)).rowcount
            except _UNSTORABLE:
                return self._insert_one_by_one(db, rows)

    def _insert_one_by_one(self, db: psycopg.Connection, rows: list[tuple[Any, ...]]) -> int:
        new = 0
        for row in rows:
            try:
                with db.transaction():
                    new += db.execute(_INSERT_ONE, _without_nul(list(row))).rowcount
            except _UNSTORABLE as exc:
                logger.error("history %s: exchange %s cannot be stored (%s)", self.where, row[0], exc)
        return new

    # -- reading -----------------------------------------------------------------------------------------

    async def search(self, query: HistoryQuery) -> HistoryPage:
        """A page of `query`; InvalidRequest when `q` is over the budget's words or prefixes, QueryTooExpensive
        when the search runs past its seconds (PostgreSQL cancels it: statement_timeout)."""
        terms = text_query(query.q, self.budget) if query.q is not None else None
        cursor = decode_cursor(query.cursor) if query.cursor else None
        await self._read_own_writes()
        try:
            async with self._pool().connection() as db, db.transaction():
                # The deadline starts once a connection is ours (not while the search queued for one).
                deadline = _Deadline(self.budget.seconds)
                await deadline.limit(db)
                if terms is None:
                    return await _listing(db, query, cursor)
                return await _ranked(db, terms, query, cursor, deadline)
        except QueryCanceled:
            raise self.budget.too_expensive() from None

    async def get(self, exchange_id: str, key_id: str | None = None) -> ExchangeRecord | None:
        await self._read_own_writes()
        owned, mine = (" AND e.key_id = %s", (key_id,)) if key_id is not None else ("", ())
        async with self._pool().connection() as db:
            sql = f"SELECT {_RECORD_COLUMNS} FROM exchanges e WHERE e.id = %s{owned} ORDER BY e.seq DESC LIMIT 1"
            row = await (await db.execute(sql, (exchange_id.replace("\x00", "\ufffd"), *mine))).fetchone()
        return _record(row) if row is not None else None

    async def stats(
        self, since: datetime | None = None, until: datetime | None = None, key_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Per UTC day and model, oldest day first; percentiles are exact nearest-rank values (percentile_disc)."""
        await self._read_own_writes()
        where, params = ["day IS NOT NULL"], []
        if key_id is not None:
            where.append("key_id = %s")
            params.append(key_id)
        if since is not None:
            where.append("ts >= %s")
            params.append(_ts_bound(since))
        if until is not None:
            where.append("ts < %s")
            params.append(_ts_bound(until))
        fractions = ", ".join(str(p / 100) for p in PERCENTILES)
        sql = (
            "SELECT day, model_key, count(*), count(*) FILTER (WHERE status = 'ok'), "
            "count(*) FILTER (WHERE status = 'error'), count(*) FILTER (WHERE status = 'cancelled'), "
            "COALESCE(sum(prompt_tokens), 0)::bigint, COALESCE(sum(completion_tokens), 0)::bigint, "
            f"percentile_disc(ARRAY[{fractions}]) WITHIN GROUP (ORDER BY latency_ms) "
            # '' and no model are one group, as in SQLite (None in the answer).
            f"FROM (SELECT *, COALESCE(model, '') AS model_key FROM exchanges WHERE {' AND '.join(where)}) e "
            "GROUP BY day, model_key ORDER BY day, model_key"
        )
        async with self._pool().connection() as db:
            rows = await (await db.execute(sql, params)).fetchall()
        return [
            {"day": day, "model": model or None, "count": count, "ok": ok, "error": error, "cancelled": cancelled,
             "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "latency_ms": _percentiles(latencies)}
            for day, model, count, ok, error, cancelled, prompt_tokens, completion_tokens, latencies in rows
        ]  # fmt: skip

    def _pool(self) -> AsyncConnectionPool:
        if self._readers is None:
            raise RuntimeError("PgHistory is not open: await open() first")
        return self._readers

    async def _read_own_writes(self) -> None:
        # What this replica has consumed is written first, so an answer just given is in the history.
        if self._records or self._pending:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.flush, _READ_FLUSH_TIMEOUT)


class _Deadline:
    """MINIVAULT_HISTORY_QUERY_SECONDS over the statements of one search, given to PostgreSQL as the
    transaction's statement_timeout: what is left of it before each long statement."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    async def limit(self, db: psycopg.AsyncConnection) -> None:
        """Set the next statements' timeout to the time left; QueryCanceled when none is."""
        left_ms = math.ceil((self.at - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise QueryCanceled("the search's time is up")
        # set_config(..., true) is SET LOCAL: it ends with the transaction, so the pool's connection is clean.
        await db.execute("SELECT set_config('statement_timeout', %s, true)", (f"{left_ms}ms",))


# -- rows ----------------------------------------------------------------------------------------------------


def _as_columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    columns = [list(column) for column in zip(*rows, strict=True)]
    for index in _TEXT_COLUMNS:
        columns[index] = _without_nul(columns[index])
    return columns


def _without_nul(values: list[Any]) -> list[Any]:
    """PostgreSQL text cannot hold U+0000 (SQLite can): it is stored as U+FFFD, the replacement character."""
    return [v.replace("\x00", "\ufffd") if isinstance(v, str) and "\x00" in v else v for v in values]


def _record(row: tuple[Any, ...]) -> ExchangeRecord:
    """The record of a row read with _RECORD_COLUMNS."""
    return PG.record(row[1:])


def _ts_bound(moment: datetime) -> str:
    """A since/until bound as a stored `ts` (milliseconds, rounded up); past year 9999, a text after every `ts`."""
    ms = epoch_ms(moment)
    try:
        m = _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        return "" if ms < 0 else "\uffff"
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}."
            f"{m.microsecond // 1000:03d}Z")  # fmt: skip


def _percentiles(values: list[float | None] | None) -> dict[str, float] | None:
    if not values or values[0] is None:
        return None
    return {f"p{p}": round(value, 2) for p, value in zip(PERCENTILES, values, strict=True) if value is not None}


# -- queries -------------------------------------------------------------------------------------------------


def text_query(q: str, budget: SearchBudget | None = None) -> list[tuple[str, bool]] | None:
    """The user's words as (text, prefix) terms, with SQLite's rules and budget (`search_terms`): every word
    must appear, `pre*` matches words starting with `pre`, "two words" in double quotes must appear together.

    Each term becomes a phraseto_tsquery (a prefix: to_tsquery with `:*` on its last word), so no input is
    a tsquery syntax error; an unpaired double quote is a 422. None when `q` holds no word (no search).
    """
    return search_terms(q, budget) or None


def _tsquery_sql(terms: list[tuple[str, bool]]) -> tuple[str, list[str]]:
    """SQL computing the tsquery of `terms` (all of them: AND), and its parameters."""
    parts, params = [], []
    for text, prefix in terms:
        head, _, last = text.rstrip().rpartition(" ")
        if not prefix or not last:
            parts.append(f"phraseto_tsquery('{TEXT_CONFIG}', %s)")
            params.append(text)
            continue
        tail = "'" + last.replace("\\", "\\\\").replace("'", "''") + "':*"
        parts.append(f"tsquery_phrase(phraseto_tsquery('{TEXT_CONFIG}', %s), to_tsquery('{TEXT_CONFIG}', %s))")
        params += [head, tail]
    return f"SELECT ({' && '.join(parts)})::text", params


def _filters(query: HistoryQuery) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("model", query.model), ("status", query.status), ("endpoint", query.endpoint),
                          ("key_id", query.key_id)):  # fmt: skip
        if value is not None:
            where.append(f"e.{column} = %s")
            params.append(value)
    if query.since is not None:
        where.append("e.ts >= %s")
        params.append(_ts_bound(query.since))
    if query.until is not None:
        where.append("e.ts < %s")
        params.append(_ts_bound(query.until))
    return where, params


async def _newest_seq(db: psycopg.AsyncConnection) -> int:
    row = await (await db.execute("SELECT COALESCE(max(seq), 0) FROM exchanges")).fetchone()
    return row[0] if row is not None else 0


async def _listing(db: psycopg.AsyncConnection, query: HistoryQuery, cursor: tuple[int, float, int] | None
                   ) -> HistoryPage:  # fmt: skip
    """Newest first by start time (then id), among the exchanges there when the first page was read."""
    where, params = _filters(query)
    if cursor is None:
        snapshot = await _newest_seq(db)
    else:
        snapshot, _, last = cursor
        previous = await (await db.execute("SELECT ts, id FROM exchanges WHERE seq = %s", (last,))).fetchone()
        if previous is None:  # not a cursor this database gave out
            return HistoryPage([], None)
        where.append("(e.ts, e.id) < (%s, %s)")
        params.extend(previous)
    where.append("e.seq <= %s")
    params.append(snapshot)
    conditions = " AND ".join(where)
    sql = f"SELECT {_RECORD_COLUMNS} FROM exchanges e WHERE {conditions} ORDER BY e.ts DESC, e.id DESC LIMIT %s"
    rows = await (await db.execute(sql, (*params, query.limit + 1))).fetchall()
    more = len(rows) > query.limit
    return HistoryPage([_record(row) for row in rows[: query.limit]],
                       encode_cursor(snapshot, 0.0, rows[query.limit - 1][0]) if more else None)  # fmt: skip


async def _ranked(db: psycopg.AsyncConnection, terms: list[tuple[str, bool]], query: HistoryQuery,
                  cursor: tuple[int, float, int] | None, deadline: _Deadline) -> HistoryPage:  # fmt: skip
    """Best match first within windows of RANK_WINDOW matches, newest window first (SQLite's `_ranked`).

    The score depends on the exchange alone, so a page computed later orders the same exchanges the
    same way, and the cursor (window top, score, seq) resumes exactly where the previous page stopped.
    """
    sql, params = _tsquery_sql(terms)
    row = await (await db.execute(sql, params)).fetchone()
    tsquery = row[0] if row is not None else ""
    if not tsquery:  # no word that makes a lexeme (punctuation only): nothing matches, as in SQLite
        return HistoryPage([], None)
    where, filter_params = _filters(query)
    if cursor is None:
        top, after = await _newest_seq(db), _AFTER_ALL
    else:
        top, score, seq = cursor
        after = (score, seq)
    window_sql = (
        f"WITH w AS (SELECT e.seq, {_SCORE} AS score FROM exchanges e "
        f"WHERE e.search @@ %s::tsquery AND e.seq <= %s {''.join(' AND ' + c for c in where)} "
        "ORDER BY e.seq DESC LIMIT %s), "
        "edge AS (SELECT count(*) AS n, min(seq) AS low FROM w) "
        "SELECT edge.n, edge.low, c.seq, c.score FROM edge LEFT JOIN LATERAL ("
        "SELECT seq, score FROM w WHERE (score, seq) < (%s::float8, %s::bigint) ORDER BY score DESC, seq DESC LIMIT %s"
        ") c ON true"
    )
    limit = query.limit
    chosen: list[tuple[int, float, int]] = []  # (seq, score, top of its window)
    first = True
    while len(chosen) <= limit and top > 0:
        if not first:  # the first window runs under the timeout `search` set
            await deadline.limit(db)
        first = False
        window = RANK_WINDOW
        rows = await (await db.execute(
            window_sql, (tsquery, tsquery, top, *filter_params, window, *after, limit + 1 - len(chosen))
        )).fetchall()  # fmt: skip
        count, low = rows[0][0], rows[0][1]
        chosen += [(seq, score, top) for _, _, seq, score in rows if seq is not None]
        after = _AFTER_ALL
        if count < window:
            break
        top = low - 1
    page = chosen[:limit]
    found: dict[int, tuple[Any, ...]] = {}
    if page:
        rows = await (await db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM exchanges e WHERE e.seq = ANY(%s)", ([seq for seq, _, _ in page],)
        )).fetchall()  # fmt: skip
        found = {row[0]: row for row in rows}
    next_cursor = None
    if len(chosen) > limit:
        seq, score, window_top = page[-1]
        next_cursor = encode_cursor(window_top, score, seq)
    return HistoryPage([_record(found[seq]) for seq, _, _ in page], next_cursor)
