"""What the record keeps beyond text (issue 16): the tools offered, the format asked, the images' sizes and
sha256 (never their bytes), the calls the model made, its thinking, the options ignored and the messages
dropped; in the log line and, through the one column spec (app/store/columns.py), in both history stores."""

import base64
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import closing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from typer.testing import CliRunner

from app.admission.slots import Admission
from app.backends import ChatInput, Completion
from app.cli import cli
from app.core.caller import Caller
from app.core.exchange import Exchange
from app.core.service import GenerationService, Timeouts
from app.errors import Busy
from app.exchanges import JsonlWriter
from app.schemas import (
    REFUSED_ITEMS,
    REFUSED_TEXT_CHARS,
    ExchangeRecord,
    LoggedError,
    LoggedImage,
    LoggedToolCall,
    RefusedRecord,
    read_record,
)
from app.store import HistoryStore
from app.store.columns import COLUMNS, PG, SQLITE
from app.store.pg_history import PgHistory
from app.store.pg_schema import migrate
from app.store.sqlite_history import SqliteHistory
from app.vocabulary import Event, Image, Message, OutputFormat, ThinkingDelta, Tool, ToolCallDelta
from tests.test_history import record

pytestmark = pytest.mark.anyio

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
JPEG = b"\xff\xd8\xff\xe0" + b"jpegdata" * 100
# Worked out apart from MiniVault (hashlib.sha256(...).hexdigest() once, by hand).
PNG_SHA256 = "a9c8a46924afca4e56d7d0dc843f8d78c0e821bbdaa0e303b2607fa55aa7d799"
JPEG_SHA256 = "2a0f832bcdffd3915f9d1eedff54f2d4af925a2b7adf57359a23a3b702c8cc15"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = Tool("get_weather", "The weather in a city.", {"type": "object", "properties": {"city": {"type": "string"}}})
NEW_FIELDS = ("tools", "format", "images", "tool_calls", "thinking", "thinking_chars", "ignored_options",
              "dropped_messages")  # fmt: skip
# What the model says: thinking, some text, one call in two argument fragments, and a second call whole.
EVENTS: list[Event] = [
    ThinkingDelta("Let me "),
    ThinkingDelta("look."),
    "Checking",
    ToolCallDelta(0, "call_a", "get_weather", '{"city":'),
    ToolCallDelta(0, arguments=' "Paris"}'),
    ToolCallDelta(1, "call_b", "get_time", "{}"),
]


class ScriptedBackend:
    """Yields its events, then says why it stopped; names the options it ignored and the messages it dropped."""

    name = "ollama"
    url = "http://127.0.0.1:9"
    default_model = "m"

    def __init__(self, events: Sequence[Event], ignored: tuple[str, ...] = (), dropped: int = 0) -> None:
        self.events = events
        self.ignored = ignored
        self.dropped = dropped

    async def stream(self, chat: ChatInput, completion: Completion) -> AsyncGenerator[Event, None]:
        completion.ignored_options, completion.dropped_messages = self.ignored, self.dropped
        for event in self.events:
            yield event
        completion.done_reason = "stop"


def vision_chat() -> ChatInput:
    """Two images in two user messages, two tools, a JSON schema and thinking asked for."""
    return ChatInput(
        "m",
        (
            Message("system", "Be brief."),
            Message("user", "What is in this?", images=(Image(PNG, "image/png"),)),
            Message("assistant", "A chart."),
            Message("user", "And this? Call a tool.", images=(Image(JPEG, "image/jpeg"),)),
        ),
        options={"num_ctx": 8192},
        tools=(WEATHER, Tool("get_time")),
        format=OutputFormat(SCHEMA),
        think=True,
    )


async def log_line(tmp_path: Path, chat: ChatInput, backend: ScriptedBackend, keep_text: bool = True) -> bytes:
    """The one line a finished exchange leaves in a real interaction log."""
    path = tmp_path / "log.jsonl"
    log = JsonlWriter(path)
    log.start()
    service = GenerationService(backend, Admission(1, 1), Timeouts(60, 60, None), [log], keep_text=keep_text)  # type: ignore[arg-type]
    await service.run(service.chat_exchange(Caller("ex-1", "ollama"), chat))
    await log.aclose()
    [line] = path.read_bytes().splitlines()
    return line


def assert_no_image_bytes(line: bytes) -> None:
    for data in (PNG, JPEG):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            assert encode(data)[:40] not in line  # whole or in a data: URL, base64 starts the same
    assert b"jpegdatajpegdata" not in line and PNG[8:40] not in line  # nor raw (JSON would escape them)


COLUMNS_IN_ORDER = (
    "SELECT column_name FROM information_schema.columns WHERE table_name = 'exchanges' ORDER BY ordinal_position"
)


# -- the log line --------------------------------------------------------------------------------------------


async def test_the_line_keeps_tools_format_images_calls_thinking_and_what_was_left_out(tmp_path: Path) -> None:
    line = await log_line(tmp_path, vision_chat(), ScriptedBackend(EVENTS, ignored=("num_ctx",), dropped=1))

    logged = orjson.loads(line)
    assert {name: logged[name] for name in NEW_FIELDS} == {
        "tools": ["get_weather", "get_time"],
        "format": SCHEMA,
        "images": [
            {"media_type": "image/png", "bytes": 1032, "sha256": PNG_SHA256},
            {"media_type": "image/jpeg", "bytes": 804, "sha256": JPEG_SHA256},
        ],
        "tool_calls": [
            {"id": "call_a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"id": "call_b", "name": "get_time", "arguments": "{}"},
        ],
        "thinking": "Let me look.",
        "thinking_chars": 12,
        "ignored_options": ["num_ctx"],
        "dropped_messages": 1,
    }
    assert (logged["prompt"], logged["system"], logged["response"], logged["response_chars"]) == (
        "And this? Call a tool.", "Be brief.", "Checking", 8
    )  # fmt: skip
    assert (logged["status"], logged["done_reason"], logged["options"]) == ("ok", "stop", {"num_ctx": 8192})
    assert_no_image_bytes(line)
    assert len(line) < 1500  # 1.8 KB of images (2.5 KB as base64) are 200 bytes of record
    # The line reads back as the record it was (what `minivault logs reindex` and the readers do).
    back = read_record(line)
    assert back.images == [LoggedImage("image/png", 1032, PNG_SHA256), LoggedImage("image/jpeg", 804, JPEG_SHA256)]
    assert back.tool_calls == [LoggedToolCall("call_a", "get_weather", '{"city": "Paris"}'),
                               LoggedToolCall("call_b", "get_time", "{}")]  # fmt: skip


async def test_without_log_prompts_thinking_and_arguments_go_but_names_and_sizes_stay(tmp_path: Path) -> None:
    line = await log_line(tmp_path, vision_chat(), ScriptedBackend(EVENTS), keep_text=False)

    logged = orjson.loads(line)
    assert (logged["thinking"], logged["thinking_chars"]) == (None, 12)
    assert logged["tool_calls"] == [
        {"id": "call_a", "name": "get_weather", "arguments": None},
        {"id": "call_b", "name": "get_time", "arguments": None},
    ]
    assert logged["tools"] == ["get_weather", "get_time"]
    assert [(image["bytes"], image["sha256"]) for image in logged["images"]] == [(1032, PNG_SHA256), (804, JPEG_SHA256)]
    assert (logged["prompt"], logged["response"], logged["prompt_chars"]) == (None, None, 22)
    for secret in (b"Paris", b"Let me", b"look.", b"Checking", b"And this"):
        assert secret not in line
    assert_no_image_bytes(line)


async def test_a_plain_exchange_leaves_every_new_field_null(tmp_path: Path) -> None:
    line = await log_line(tmp_path, ChatInput.single("m", "hello", "Be brief."), ScriptedBackend(["hi", " there"]))

    logged = orjson.loads(line)
    assert {name: logged[name] for name in NEW_FIELDS} == dict.fromkeys(NEW_FIELDS)
    assert (logged["prompt"], logged["response"]) == ("hello", "hi there")


async def test_a_plain_exchange_still_names_the_options_its_backend_ignored(tmp_path: Path) -> None:
    chat = ChatInput.single("m", "hello", options={"num_ctx": 4096, "num_thread": 2})
    line = await log_line(tmp_path, chat, ScriptedBackend(["hi"], ignored=("num_ctx", "num_thread"), dropped=3))

    logged = orjson.loads(line)
    assert (logged["ignored_options"], logged["dropped_messages"]) == (["num_ctx", "num_thread"], 3)
    assert (logged["tools"], logged["images"], logged["tool_calls"], logged["thinking"]) == (None, None, None, None)


def test_any_json_is_recorded_as_json_and_thinking_alone_is_enough_to_record_it() -> None:
    backend: Any = ScriptedBackend([])
    asked_json = Exchange(Caller("j", "ollama"), backend, chat=ChatInput.single("m", "a list", format=OutputFormat()))
    record_of_json = asked_json.record(keep_text=True)
    assert (record_of_json.format, record_of_json.tools, record_of_json.images) == ("json", None, None)

    thought = Exchange(Caller("t", "rest"), backend, chat=ChatInput.single("m", "hm"))  # a plain request...
    thought.absorb(ThinkingDelta("because"))  # ...whose model thought anyway
    kept = thought.record(keep_text=True)
    assert (kept.thinking, kept.thinking_chars, kept.tool_calls, kept.format) == ("because", 7, None, None)


def test_a_refusal_keeps_a_bounded_part_of_its_lists_and_texts() -> None:
    backend: Any = ScriptedBackend([])
    huge_schema = {"type": "object", "properties": {f"field{n}": {"type": "string"} for n in range(500)}}
    many = ChatInput(
        "m",
        tuple(Message("user", f"look {n}", images=(Image(PNG, "image/png"),)) for n in range(100)),
        tools=tuple(Tool(f"tool_{n}") for n in range(200)),
        format=OutputFormat(huge_schema),
    )
    refused = Exchange(Caller("r", "rest"), backend, prompt=many.prompt, chat=many)
    refused.absorb(ThinkingDelta("t" * 5000))
    refused.absorb(ToolCallDelta(0, "call_0", "tool_0", "a" * 5000))
    refused.status, refused.error = "error", Busy("the queue is full", retry_after=1)

    record = refused.record(keep_text=True)

    assert type(record) is RefusedRecord
    assert record.tools == [f"tool_{n}" for n in range(REFUSED_ITEMS)]
    assert record.images is not None and len(record.images) == REFUSED_ITEMS == 32
    assert record.format == orjson.dumps(huge_schema).decode()[:REFUSED_TEXT_CHARS]
    assert (record.thinking, record.thinking_chars) == ("t" * REFUSED_TEXT_CHARS, 5000)
    assert record.tool_calls == [LoggedToolCall("call_0", "tool_0", "a" * REFUSED_TEXT_CHARS)]
    assert len(orjson.dumps(record)) < 12_000  # whatever the request held

    refused.accepted = True  # the same exchange failing after admission is kept whole
    whole = refused.record(keep_text=True)
    assert type(whole) is ExchangeRecord
    assert (len(whole.tools or ()), len(whole.images or ()), whole.format) == (200, 100, huge_schema)
    assert whole.thinking == "t" * 5000


async def test_minivault_logs_shows_the_calls_an_exchange_made(tmp_path: Path) -> None:
    await log_line(tmp_path, vision_chat(), ScriptedBackend(EVENTS))

    shown = CliRunner().invoke(cli, ["logs", "-n", "1", "--path", str(tmp_path / "log.jsonl")])

    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[1:] == [
        "  > And this? Call a tool.", "  < Checking", '  < get_weather({"city": "Paris"})', "  < get_time({})"
    ]  # fmt: skip


# -- the stores, through the one column spec -----------------------------------------------------------------


FULL = record(
    1, "What is in this?", "Checking", client="127.0.0.1:5000", key_id="k1", conversation_id="c-1", system="Be brief.",
    options={"num_ctx": 8192}, error=LoggedError("upstream_error", "it broke"), status="error", done_reason="stop",
    prompt_tokens=3, completion_tokens=2, queue_ms=1.5, ttft_ms=20.25, upstream="http://127.0.0.1:11434",
    tools=["get_weather", "get_time"], format=SCHEMA,
    images=[LoggedImage("image/png", 1032, PNG_SHA256), LoggedImage("image/jpeg", 804, JPEG_SHA256)],
    tool_calls=[LoggedToolCall("call_a", "get_weather", '{"city": "Paris"}'),
                LoggedToolCall("call_b", "get_time", "{}")],
    thinking="Let me look.", thinking_chars=12, ignored_options=["num_ctx"], dropped_messages=1,
)  # fmt: skip


@pytest.fixture(params=["sqlite", "postgres"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[HistoryStore, HistoryStore]]:
    """Of each kind, a store keeping texts and one keeping none, on one database (as two workers would be)."""
    made: list[SqliteHistory | PgHistory] = []
    for keep_text in (True, False):
        if request.param == "sqlite":
            made.append(SqliteHistory(tmp_path / "history.db", keep_text=keep_text))
        else:
            store = PgHistory(request.getfixturevalue("pg_url"), keep_text=keep_text)
            await store.open()
            made.append(store)
    yield made[0], made[1]
    for store in made:
        await store.aclose()


async def test_both_stores_give_back_every_field_of_the_record(stores: tuple[HistoryStore, HistoryStore]) -> None:
    kept, textless = stores
    assert kept.add_many([FULL]) == 1
    assert textless.add_many([replace(FULL, id="ex0009"), record(2, format="json")]) == 2

    assert await kept.get("ex0001") == FULL
    without = await textless.get("ex0009")
    assert without is not None
    assert (without.prompt, without.response, without.thinking, without.thinking_chars) == (None, None, None, 12)
    assert without.tool_calls == [
        LoggedToolCall("call_a", "get_weather", None),
        LoggedToolCall("call_b", "get_time", None),
    ]
    assert (without.tools, without.images, without.format) == (FULL.tools, FULL.images, SCHEMA)
    assert (without.upstream, without.ignored_options, without.dropped_messages) == (FULL.upstream, ["num_ctx"], 1)
    plain = await textless.get("ex0002")
    assert plain is not None and plain.format == "json"
    assert {name: getattr(plain, name) for name in NEW_FIELDS if name != "format"} == dict.fromkeys(
        set(NEW_FIELDS) - {"format"}
    )


async def test_a_consumed_record_is_stored_as_the_log_wrote_it(tmp_path: Path) -> None:
    line = await log_line(tmp_path, vision_chat(), ScriptedBackend(EVENTS, ignored=("num_ctx",)))
    logged = read_record(line)
    history = SqliteHistory(tmp_path / "history.db")
    history.start()
    try:
        history.consume(logged)
        stored = await history.get("ex-1")  # reads what this process consumed first
    finally:
        await history.aclose()
    assert stored == logged
    assert orjson.dumps(stored) == line


async def test_sqlite_stores_the_upstream_in_its_own_column(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    history = SqliteHistory(path)
    history.add_many([record(1, upstream="http://gpu-2:11434"), record(2)])
    history.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT id, upstream FROM exchanges ORDER BY seq").fetchall() == [
            ("ex0001", "http://gpu-2:11434"), ("ex0002", None)
        ]  # fmt: skip


# Schema 3's `exchanges` before issue 16: no upstream (PostgreSQL had it), none of the fields beyond text.
OLD_SQLITE_COLUMNS = [
    "seq", "id", "ts", "day", "endpoint", "client", "key_id", "conversation_id", "backend", "model", "prompt",
    "system", "options", "response", "prompt_chars", "response_chars", "status", "error_code", "error_message",
    "done_reason", "prompt_tokens", "completion_tokens", "queue_ms", "ttft_ms", "latency_ms", "latency_bucket",
]  # fmt: skip
ADDED = ["upstream", *NEW_FIELDS]


async def test_an_old_sqlite_database_gains_the_new_columns_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    made = SqliteHistory(path)
    made.add_many([record(1, "an old exchange")])
    made.close()
    with closing(sqlite3.connect(path, isolation_level=None)) as db:  # back to the table an older MiniVault made
        for name in ADDED:
            db.execute(f"ALTER TABLE exchanges DROP COLUMN {name}")
        assert [row[1] for row in db.execute("PRAGMA table_info(exchanges)")] == OLD_SQLITE_COLUMNS
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3

    reopened = SqliteHistory(path)
    try:
        columns = reopened.read(lambda db: [row[1] for row in db.execute("PRAGMA table_info(exchanges)")])
        assert columns == [*OLD_SQLITE_COLUMNS, *ADDED]
        old = await reopened.get("ex0001")
        assert old is not None and (old.prompt, old.upstream, old.tool_calls) == ("an old exchange", None, None)
        assert reopened.add_many([record(2, **{name: getattr(FULL, name) for name in ADDED})]) == 1
        new = await reopened.get("ex0002")
        assert new is not None and (new.upstream, new.images, new.tool_calls) == (
            FULL.upstream, FULL.images, FULL.tool_calls
        )  # fmt: skip
    finally:
        reopened.close()
    again = SqliteHistory(path)  # and opened once more, nothing is added twice
    try:
        assert again.read(lambda db: len(db.execute("PRAGMA table_info(exchanges)").fetchall())) == 35
    finally:
        again.close()


async def test_an_old_postgres_database_gains_the_new_columns_when_migrated(pg_url: str) -> None:
    migrate(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as db:
        for name in NEW_FIELDS:  # PostgreSQL's table had `upstream` already
            db.execute(f"ALTER TABLE exchanges DROP COLUMN {name}")
    store = PgHistory(pg_url)
    await store.open()  # migrates: the same schema version, so only the spec's columns can tell
    try:
        store.add_many([FULL])
        assert await store.get("ex0001") == FULL
    finally:
        await store.aclose()
    with psycopg.connect(pg_url) as db:
        columns = [row[0] for row in db.execute(COLUMNS_IN_ORDER)]
    assert columns[-len(NEW_FIELDS) :] == list(NEW_FIELDS)


# -- the spec itself -----------------------------------------------------------------------------------------


def test_every_field_of_the_record_is_read_back_by_exactly_one_column() -> None:
    read = [column.of for column in COLUMNS if column.read is not None]
    assert sorted(read) == sorted(field.name for field in fields(ExchangeRecord))
    assert SQLITE.names == tuple(column.name for column in COLUMNS)
    assert [column.name for column in COLUMNS if column not in PG.columns] == ["latency_bucket"]  # SQLite's own
    assert all(not column.not_null for column in COLUMNS[25:])  # what an old table gains needs no default


async def test_a_new_table_has_the_spec_s_columns_in_both_stores(tmp_path: Path, pg_url: str) -> None:
    sqlite = SqliteHistory(tmp_path / "history.db")
    try:
        made = sqlite.read(lambda db: [row[1] for row in db.execute("PRAGMA table_info(exchanges)")])
    finally:
        sqlite.close()
    assert made == ["seq", *SQLITE.names]
    migrate(pg_url)
    with psycopg.connect(pg_url) as db:
        columns = [row[0] for row in db.execute(COLUMNS_IN_ORDER)]
    assert columns == ["seq", *PG.names, "text_chars", "search"]
