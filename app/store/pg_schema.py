"""The PostgreSQL schema of the history and the conversations, and its migration at start-up.

Every replica migrates when it starts; a transaction-level advisory lock makes the second one wait for
the first and then find the schema done (concurrent `CREATE TABLE IF NOT EXISTS` can otherwise fail on
PostgreSQL's own catalog). `minivault_schema` holds the version; a newer database than this code knows
is refused rather than written to. A record column this code has and the table lacks (app/store/columns.py)
is added whatever the version, as SQLite's store does: a new field needs no new version.
"""

import logging
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from app.store.columns import PG

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
TEXT_CONFIG = "minivault_text"
# pg_advisory_xact_lock key of the migration (any fixed 64-bit number; this one spells "MiniVlt1").
_MIGRATION_LOCK = 0x4D696E69566C7431
# Each prompt and answer is indexed up to here: a tsvector holds at most 1 MB, and an insert past that fails.
INDEXED_CHARS = 100_000
# Token types that can carry accented letters: `unaccent` folds them before `simple` lowercases.
_LETTER_TOKENS = "word, numword, hword, numhword, hword_part, hword_numpart"

_TABLES = [
    # The record's columns come from app/store/columns.py; texts that sort compare byte-wise (COLLATE "C"),
    # as in SQLite: ids, start times and models sort the same whatever the database's locale, and the (ts, id)
    # order of a listing never depends on it.
    f"""CREATE TABLE IF NOT EXISTS exchanges (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        {", ".join(column.pg_declaration() for column in PG.columns)},
        -- The ranking's length, kept so a search never reads the texts it ranks.
        text_chars integer GENERATED ALWAYS AS (COALESCE(length(prompt), 0) + COALESCE(length(response), 0)) STORED,
        search tsvector GENERATED ALWAYS AS (to_tsvector('{TEXT_CONFIG}',
            left(COALESCE(prompt, ''), {INDEXED_CHARS}) || ' ' || left(COALESCE(response, ''), {INDEXED_CHARS}))) STORED
    )""",
    # An exchange is its start time and id (a client may reuse an id; a log line read twice is a duplicate).
    "CREATE UNIQUE INDEX IF NOT EXISTS exchanges_by_start ON exchanges (ts, id)",
    "CREATE INDEX IF NOT EXISTS exchanges_by_id ON exchanges (id)",
    "CREATE INDEX IF NOT EXISTS exchanges_by_model ON exchanges (model, ts)",
    "CREATE INDEX IF NOT EXISTS exchanges_by_status ON exchanges (status, ts)",
    "CREATE INDEX IF NOT EXISTS exchanges_text ON exchanges USING gin (search)",
    """CREATE TABLE IF NOT EXISTS conversations (
        id text COLLATE "C" PRIMARY KEY,
        title text,
        system text,
        created text NOT NULL,
        updated text NOT NULL,
        seq bigint NOT NULL
    )""",
    # Every change takes the next number: the order of GET /conversations, and its cursor.
    "CREATE SEQUENCE IF NOT EXISTS conversation_changes",
    "CREATE INDEX IF NOT EXISTS conversations_by_seq ON conversations (seq)",
    """CREATE TABLE IF NOT EXISTS turns (
        conversation_id text COLLATE "C" NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        n integer NOT NULL,
        prompt text NOT NULL,
        response text NOT NULL,
        exchange_id text NOT NULL,
        ts text NOT NULL,
        PRIMARY KEY (conversation_id, n)
    )""",
]


class PgUnavailable(Exception):
    """PostgreSQL cannot be reached, or its schema cannot be made; the message says which and why."""


def describe(conninfo: str) -> str:
    """user@host:port/database of a connection string, without its password (for messages and logs)."""
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "(an unreadable MINIVAULT_DATABASE_URL)"
    where = f"{parts.get('host') or 'localhost'}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"
    return f"{parts['user']}@{where}" if parts.get("user") else where


def connect(conninfo: str, connect_timeout: float, **kwargs: Any) -> psycopg.Connection:
    """A blocking connection; PgUnavailable (naming the server, not the password) when there is none."""
    try:
        return psycopg.connect(conninfo, connect_timeout=max(1, round(connect_timeout)), **kwargs)
    except psycopg.Error as exc:
        raise PgUnavailable(
            f"cannot connect to PostgreSQL at {describe(conninfo)} ({str(exc).strip()}); check MINIVAULT_DATABASE_URL"
        ) from exc


def migrate(conninfo: str, connect_timeout: float = 10.0) -> None:
    """Bring the database to SCHEMA_VERSION (blocking); safe to run from several replicas at once."""
    with connect(conninfo, connect_timeout, autocommit=True) as db:
        try:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                db.execute("CREATE TABLE IF NOT EXISTS minivault_schema (version integer NOT NULL)")
                row = db.execute("SELECT max(version) FROM minivault_schema").fetchone()
                version = row[0] if row is not None and row[0] is not None else 0
                if version > SCHEMA_VERSION:
                    raise PgUnavailable(
                        f"the database at {describe(conninfo)} was made by a newer MiniVault (schema {version}, "
                        f"this one knows {SCHEMA_VERSION}); run that version"
                    )
                for step in _STEPS[version:]:
                    step(db)
                _add_missing_columns(db)
                if version < SCHEMA_VERSION:
                    db.execute("DELETE FROM minivault_schema")
                    db.execute("INSERT INTO minivault_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        except psycopg.Error as exc:
            hint = ""
            if isinstance(exc, psycopg.errors.InsufficientPrivilege):
                hint = "; the user needs CREATE on the database and its schema (own them, or GRANT CREATE)"
            raise PgUnavailable(
                f"cannot create MiniVault's tables in {describe(conninfo)} ({str(exc).strip()}){hint}"
            ) from exc


def _v1(db: psycopg.Connection) -> None:
    try:
        with db.transaction():  # a savepoint: a refusal here leaves the migration's transaction usable
            db.execute("CREATE EXTENSION IF NOT EXISTS unaccent")
        dictionaries = "unaccent, simple"
    except psycopg.Error as exc:
        logger.warning("PostgreSQL: no unaccent extension (%s); history search will not fold accents (café is not "
                       "cafe); a superuser can run CREATE EXTENSION unaccent before MiniVault first starts",
                       str(exc).strip())  # fmt: skip
        dictionaries = "simple"
    # `simple`: every word as written (lowercased), in any language, as SQLite's FTS5 does; no stemming
    # and no stop words, so a search for "the" or "running" finds exactly those words.
    db.execute(f"CREATE TEXT SEARCH CONFIGURATION {TEXT_CONFIG} (COPY = simple)")
    db.execute(f"ALTER TEXT SEARCH CONFIGURATION {TEXT_CONFIG} ALTER MAPPING FOR {_LETTER_TOKENS} WITH {dictionaries}")
    for statement in _TABLES:
        db.execute(statement)


# Version 2 (each key sees its own): what schema 1 lacks to scope data by key.
_V2 = [
    # Conversations: the key_id of the key that made each (NULL for one made with auth off), and an index
    # so that one key's listing reads only its own.
    "ALTER TABLE conversations ADD COLUMN IF NOT EXISTS key_id text",
    "CREATE INDEX IF NOT EXISTS conversations_by_key ON conversations (key_id, seq)",
    # History: one key's exchanges newest first, for an ordinary key's GET /history and
    # /history/stats (key_id = ... ORDER BY ts DESC, id DESC walks it).
    "CREATE INDEX IF NOT EXISTS exchanges_by_key ON exchanges (key_id, ts, id)",
]


def _v2(db: psycopg.Connection) -> None:
    for statement in _V2:
        db.execute(statement)


_STEPS: list[Callable[[psycopg.Connection], None]] = [_v1, _v2]


def _add_missing_columns(db: psycopg.Connection) -> None:
    """Add the record's columns that a table made by an older MiniVault lacks (nullable: no row is rewritten)."""
    present = db.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = 'exchanges'"
    ).fetchall()
    # Only what is missing is altered: ALTER TABLE takes the table's strongest lock, even for a column there.
    for column in PG.missing(name for (name,) in present):
        db.execute(f"ALTER TABLE exchanges ADD COLUMN IF NOT EXISTS {column.pg_declaration()}")
