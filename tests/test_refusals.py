"""Refusals are cheap (issue 15, §2): a refused request keeps 1 KiB of its text (and its true length), counts
against the rate limit, a websocket flooding invalid frames is closed, and the writers' queues are bounded
in bytes, summarizing refusals (never accepted exchanges) when over it."""

import asyncio
import json
import logging
import os
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.core.caller import Caller
from app.core.exchange import Exchange
from app.errors import InvalidRequest
from app.exchanges import JsonlWriter
from app.exchanges.metrics import Metrics
from app.main import create_app
from app.schemas import REFUSED_TEXT_CHARS, ExchangeRecord, RefusedRecord
from app.store.sqlite_history import SqliteHistory
from app.web.auth import key_id
from tests.conftest import make_settings, read_log
from tests.support.servers import RunningServer, serve_in_thread

pytestmark = pytest.mark.anyio
MAX_PROMPT_CHARS = 1000
# Ten distinct characters repeated: a cut that kept the wrong part would show.
HUGE = "0123456789" * 100_000
SUMMARIZED = "minivault_refusals_summarized_total"


@pytest.fixture
def vault(fake_server: RunningServer, log_path: Path, tmp_path: Path) -> Iterator[RunningServer]:
    settings = make_settings(
        ollama_base_url=fake_server.url, log_path=log_path, db_path=tmp_path / "minivault.db",
        max_prompt_chars=MAX_PROMPT_CHARS, max_body_bytes=4 * 1_048_576,
    )  # fmt: skip
    with serve_in_thread(create_app(settings)) as server:
        yield server


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await ws.recv(decode=True))


# -- 1 KiB of a refused request's text ---------------------------------------------------------------------


async def test_a_refused_prompt_keeps_1024_characters_and_its_true_length_in_the_log_and_the_history(
    vault: RunningServer, log_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=vault.url, timeout=30) as client:
        rest = await client.post("/generate", json={"prompt": HUGE}, headers={"X-Request-ID": "huge-rest"})
        openai = await client.post(
            "/v1/chat/completions", headers={"X-Request-ID": "huge-openai"},
            json={"model": "tinyllama:1.1b-chat", "messages": [{"role": "user", "content": HUGE}]},
        )  # fmt: skip
        long_model = await client.post(
            "/v1/chat/completions",
            json={"model": "m" * 5000, "messages": "nope"},
            headers={"X-Request-ID": "huge-model"},
        )
        accepted = await client.post(
            "/generate", json={"prompt": HUGE[:MAX_PROMPT_CHARS]}, headers={"X-Request-ID": "accepted"}
        )
        async with connect(f"{vault.ws_url}/ws/generate", max_size=None) as ws:
            await ws.send(json.dumps({"id": "huge-ws", "prompt": HUGE}))
            ws_error = await recv(ws)
            await ws.send(json.dumps({"id": "huge-type", "type": "t" * 5000}))
            type_error = await recv(ws)
        history = {
            request_id: (await client.get(f"/history/{request_id}")).json()
            for request_id in ("huge-rest", "huge-openai", "huge-ws", "accepted")
        }

    assert (rest.status_code, rest.json()["error"]["code"]) == (422, "invalid_request")
    assert rest.json()["error"]["message"] == (
        "prompt: is 1000000 characters; the limit is 1000 (MINIVAULT_MAX_PROMPT_CHARS)"
    )
    assert (openai.status_code, long_model.status_code, accepted.status_code) == (422, 422, 200)
    assert (ws_error["code"], ws_error["id"], type_error["code"]) == ("invalid_request", "huge-ws", "invalid_request")
    # The unknown type is echoed (and logged) in its first 100 characters only.
    assert type_error["message"] == f'type: unknown frame type "{"t" * 99}; use "generate" or "cancel"'
    vault.stop()
    lines = {line["id"]: line for line in read_log(log_path)}
    assert list(lines) == ["huge-rest", "huge-openai", "huge-model", "accepted", "huge-ws", "huge-type"]
    for request_id in ("huge-rest", "huge-openai", "huge-ws"):
        line = lines[request_id]
        assert (line["status"], line["prompt"], line["prompt_chars"]) == ("error", HUGE[:1024], 1_000_000)
        assert (history[request_id]["prompt"], history[request_id]["prompt_chars"]) == (HUGE[:1024], 1_000_000)
    assert (lines["huge-model"]["model"], lines["huge-model"]["prompt"]) == ("m" * 1024, None)
    # Accepted: stored whole, as always.
    assert (lines["accepted"]["prompt"], lines["accepted"]["prompt_chars"]) == (HUGE[:1000], 1000)
    assert (history["accepted"]["prompt"], history["accepted"]["status"]) == (HUGE[:1000], "ok")
    assert lines["huge-type"]["error"]["message"] == type_error["message"]


def test_only_refusals_are_cut_and_an_error_message_too() -> None:
    # The record itself: a refused exchange is a RefusedRecord with its texts cut; an admitted one is whole.
    backend: Any = SimpleNamespace(name="ollama", default_model="tinyllama:1.1b-chat")
    refused = Exchange(Caller("r", "rest"), backend, prompt=HUGE, system=HUGE, model="m" * 2000)
    refused.status, refused.error = "error", InvalidRequest("x" * 5000)
    record = refused.record(keep_text=True)
    assert type(record) is RefusedRecord
    assert (record.prompt, record.system, record.model) == (HUGE[:1024], HUGE[:1024], "m" * 1024)
    assert (record.prompt_chars, record.error.message if record.error else None) == (1_000_000, "x" * 1024)
    assert REFUSED_TEXT_CHARS == 1024

    admitted = Exchange(Caller("a", "rest"), backend, prompt=HUGE, system=HUGE)
    admitted.accepted = True
    admitted.status, admitted.error = "error", InvalidRequest("y" * 5000)  # failed after admission: kept whole
    whole = admitted.record(keep_text=True)
    assert type(whole) is ExchangeRecord
    assert (whole.prompt, whole.system, whole.error.message if whole.error else None) == (HUGE, HUGE, "y" * 5000)


# -- refusals count against the rate limit --------------------------------------------------------------------


async def test_refusals_count_against_the_rate_limit_per_key_and_over_it_the_answer_is_429(
    fake_server: RunningServer, log_path: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        ollama_base_url=fake_server.url, log_path=log_path, db_path=tmp_path / "minivault.db",
        max_prompt_chars=MAX_PROMPT_CHARS, rate_limit=3, api_keys="key-a,key-b",
    )  # fmt: skip
    bad = {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}
    with serve_in_thread(create_app(settings)) as vault:
        async with httpx.AsyncClient(base_url=vault.url, timeout=30, headers={"X-API-Key": "key-a"}) as client:
            answers = [await client.post("/generate", json=bad) for _ in range(3)]
            over_bad = await client.post("/generate", json=bad)
            over_openai = await client.post("/v1/chat/completions", json={"messages": "nope"})
            over_good = await client.post("/generate", json={"prompt": "hello"})
            other_key = await client.post("/generate", json={"prompt": "hello"}, headers={"X-API-Key": "key-b"})
        async with connect(f"{vault.ws_url}/ws/generate?api_key=key-b") as ws:
            frames = []
            for _ in range(3):  # key-b has sent one prompt: two more tokens, then 429s
                await ws.send("not json")
                frames.append(await recv(ws))
    assert [answer.status_code for answer in answers] == [422, 422, 422]
    assert (over_bad.status_code, over_bad.json()["error"]["code"]) == (429, "rate_limited")
    assert int(over_bad.headers["Retry-After"]) in range(15, 21)  # 60 s / 3 prompts, less the test's own time
    assert (over_openai.status_code, over_openai.json()["error"]["code"]) == (429, "rate_limited")
    assert (over_good.status_code, over_good.json()["error"]["code"]) == (429, "rate_limited")
    assert other_key.status_code == 200
    assert [frame["code"] for frame in frames] == ["invalid_request", "invalid_request", "rate_limited"]
    lines = read_log(log_path)
    a, b = key_id("key-a"), key_id("key-b")
    assert [(line["key_id"], line["status"], (line["error"] or {}).get("code")) for line in lines] == [
        (a, "error", "invalid_request"), (a, "error", "invalid_request"), (a, "error", "invalid_request"),
        (a, "error", "rate_limited"), (a, "error", "rate_limited"), (a, "error", "rate_limited"),
        (b, "ok", None), (b, "error", "invalid_request"), (b, "error", "invalid_request"), (b, "error", "rate_limited"),
    ]  # fmt: skip
    # The rate-limited refusal is logged like the others (its 1,001 characters are under the 1 KiB kept).
    assert (lines[3]["prompt"], lines[3]["prompt_chars"]) == ("x" * 1001, 1001)


# -- a websocket flooding invalid frames ----------------------------------------------------------------------


async def flood(url: str, frame: str) -> tuple[list[dict[str, Any]], int | None]:
    """Send `frame` as fast as the socket takes it until the server closes it; the error frames and close code."""
    received: list[dict[str, Any]] = []
    async with connect(url) as ws:

        async def send() -> None:
            sent = 0
            try:
                while True:
                    await ws.send(frame)
                    sent += 1
                    if sent % 10 == 0:
                        # send() rarely waits, so without this the reader would never run (and a client that
                        # never reads sees its connection reset, 1006: the server closes it all the same).
                        await anyio.lowlevel.checkpoint()
            except ConnectionClosed:
                pass

        async def receive() -> None:
            try:
                while True:
                    received.append(await recv(ws))
            except ConnectionClosed:
                pass

        async with anyio.create_task_group() as group:
            group.start_soon(send)
            group.start_soon(receive)
        return received, ws.close_code


async def test_a_websocket_sending_invalid_frames_as_fast_as_it_can_is_closed_1008_after_the_limit(
    vault: RunningServer, log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.routes.ws")
    with anyio.fail_after(30):
        errors, code = await flood(f"{vault.ws_url}/ws/generate", '{"prompt": 5}')
        async with connect(f"{vault.ws_url}/ws/generate") as ws:  # a new connection is served at once
            await ws.send(json.dumps({"prompt": "still here", "id": "after"}))
            while (frame := await recv(ws))["type"] != "done":
                pass
    assert code == 1008
    assert [error["code"] for error in errors] == ["invalid_request"] * 20 + ["too_many_invalid_frames"]
    assert errors[-1]["message"] == (
        "more than 20 invalid frames within 10 s (MINIVAULT_WS_MAX_INVALID_FRAMES=20); closing the connection: "
        "fix the frames and reconnect"
    )
    assert frame["response"] == "still here"
    vault.stop()
    lines = read_log(log_path)
    # One record per refused frame up to the limit, one for the close, then the next connection's prompt.
    assert [(line["error"] or {}).get("code") for line in lines] == (
        ["invalid_request"] * 20 + ["too_many_invalid_frames", None]
    )
    closes = [r for r in caplog.records if r.name == "app.routes.ws" and "closed (1008)" in r.getMessage()]
    assert len(closes) == 1


async def test_invalid_frames_spread_wider_than_the_window_never_close_the_socket(
    fake_server: RunningServer, log_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The window, not the total, counts: a 0.5 s window here (10 s in production), 5 frames in it at most.
    from app.routes import ws as ws_route  # noqa: PLC0415

    monkeypatch.setattr(ws_route, "INVALID_WINDOW", 0.5)
    settings = make_settings(
        ollama_base_url=fake_server.url, log_path=log_path, db_path=tmp_path / "m.db", ws_max_invalid_frames=5
    )
    codes = []
    with serve_in_thread(create_app(settings)) as vault, anyio.fail_after(30):
        async with connect(f"{vault.ws_url}/ws/generate") as ws:
            for _ in range(3):
                window_start = time.monotonic()
                for _ in range(5):
                    await ws.send("[]")
                    codes.append((await recv(ws))["code"])
                await anyio.sleep(max(0.0, window_start + 0.55 - time.monotonic()))  # the window passing is the point
            for _ in range(6):  # six within one window: the sixth is one too many
                await ws.send("[]")
                codes.append((await recv(ws))["code"])
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            close_code = ws.close_code
    assert codes == ["invalid_request"] * 20 + ["too_many_invalid_frames"]
    assert close_code == 1008


async def test_a_flood_of_invalid_frames_neither_floods_the_log_nor_slows_another_client(
    vault: RunningServer, log_path: Path
) -> None:
    latencies: list[float] = []
    connections = 0
    with anyio.fail_after(40):
        async with httpx.AsyncClient(base_url=vault.url, timeout=30) as client:
            await client.post("/generate", json={"prompt": "warm up"})
            deadline = time.monotonic() + 2.0

            async def flooder() -> None:
                nonlocal connections
                # Reconnecting as soon as it is closed: every connection runs to its close.
                while time.monotonic() < deadline:
                    errors, code = await flood(f"{vault.ws_url}/ws/generate", "not json at all")
                    assert (len(errors), errors[-1]["code"], code) == (21, "too_many_invalid_frames", 1008)
                    connections += 1

            async def second_client() -> None:
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    answer = await client.post("/generate", json={"prompt": "are you there"})
                    latencies.append(time.perf_counter() - started)
                    assert answer.status_code == 200
                    await asyncio.sleep(0.01)

            async with anyio.create_task_group() as group:
                for _ in range(2):
                    group.start_soon(flooder)
                group.start_soon(second_client)
    assert connections >= 4
    print(f"{connections} flooding connections; p50 {statistics.median(latencies) * 1000:.1f} ms of {len(latencies)}")
    assert statistics.median(latencies) < 0.1, latencies
    vault.stop()
    lines = read_log(log_path)
    # Exactly 21 records per flooding connection (20 refusals and the close), plus the answered prompts.
    assert len(lines) == 21 * connections + len(latencies) + 1
    assert sum(1 for line in lines if line["status"] == "ok") == len(latencies) + 1


# -- the writers' queues, bounded in bytes --------------------------------------------------------------------


def record(number: int, *, refused: bool = False, text: str = "t" * 400) -> ExchangeRecord:
    kind = RefusedRecord if refused else ExchangeRecord
    return kind(
        id=f"{'r' if refused else 'a'}{number:04d}", ts="2026-01-01T00:00:00.000Z", endpoint="rest", backend="ollama",
        prompt=text, prompt_chars=len(text), status="error" if refused else "ok",
    )  # fmt: skip


def summarized(metrics: Metrics, writer: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(f'{SUMMARIZED}{{writer="{writer}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"no {SUMMARIZED} for {writer}")


async def test_the_log_over_its_byte_bound_summarizes_refusals_and_keeps_every_accepted_line(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.exchanges.jsonl")
    metrics = Metrics()
    line_bytes = len(orjson.dumps(record(0), option=orjson.OPT_APPEND_NEWLINE))
    writer = JsonlWriter(log_path, max_queue_bytes=10 * line_bytes, on_summarized=metrics.summarized("log"))
    # Not started: nothing drains, so the queue only grows and every count below is exact.
    for number in range(5):
        writer.write(record(number, refused=True))  # under the bound: queued
    for number in range(100):
        writer.write(record(number))  # accepted: always queued, far past the bound
    for number in range(5, 55):
        writer.write(record(number, refused=True))  # over it: counted, not queued
    assert (writer.refusals_summarized, summarized(metrics, "log")) == (50, 50.0)
    writer.start()
    assert await anyio.to_thread.run_sync(writer.flush, 10)
    writer.write(record(55, refused=True))  # drained: written again
    await writer.aclose()

    ids = [line["id"] for line in read_log(log_path)]
    assert ids == [f"r{n:04d}" for n in range(5)] + [f"a{n:04d}" for n in range(100)] + ["r0055"]
    assert summarized(metrics, "log") == 50.0
    warnings = [r for r in caplog.records if "MINIVAULT_WRITER_QUEUE_BYTES" in r.getMessage()]
    assert len(warnings) == 1


async def test_the_history_over_its_byte_bound_summarizes_refusals_and_stores_every_accepted_exchange(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.exchanges.batch_writer")
    metrics = Metrics()
    history = SqliteHistory(tmp_path / "h.db", linger=0)
    history.bound_queue(20_000, metrics.summarized("history"))  # a row of 400 characters counts 912 bytes
    # No writer thread: nothing is written until flush() writes it here, so every count is exact.
    for number in range(5):
        history.consume(record(number, refused=True))
    for number in range(100):
        history.consume(record(number))
    for number in range(5, 55):
        history.consume(record(number, refused=True))
    assert (history.refusals_summarized, summarized(metrics, "history")) == (50, 50.0)
    assert history.flush(10)  # drained: the next refusal is stored, and a new episode warns again
    history.consume(record(55, refused=True))
    for number in range(100, 200):
        history.consume(record(number))
    for number in range(56, 66):
        history.consume(record(number, refused=True))
    await history.aclose()

    assert stored_ids(tmp_path / "h.db") == sorted(
        [f"a{n:04d}" for n in range(200)] + [f"r{n:04d}" for n in [0, 1, 2, 3, 4, 55]]
    )
    assert summarized(metrics, "history") == 60.0
    warnings = [r for r in caplog.records if "MINIVAULT_WRITER_QUEUE_BYTES" in r.getMessage()]
    assert len(warnings) == 2


def stored_ids(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return sorted(row[0] for row in db.execute("SELECT id FROM exchanges"))


async def test_a_refusal_flood_against_a_stuck_log_is_summarized_in_metrics_and_no_accepted_exchange_is_lost(
    fake_server: RunningServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A FIFO nobody reads yet: the log's writer blocks opening it, like a stalled disk, and everything queues.
    caplog.set_level(logging.WARNING)
    log_path = tmp_path / "log.jsonl"
    os.mkfifo(log_path)
    settings = make_settings(
        ollama_base_url=fake_server.url, log_path=log_path, db_path=tmp_path / "minivault.db",
        max_prompt_chars=MAX_PROMPT_CHARS, writer_queue_bytes=10_000,
    )  # fmt: skip
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(log_path.read_bytes()), daemon=True)
    app = create_app(settings)
    with serve_in_thread(app) as vault:
        async with httpx.AsyncClient(base_url=vault.url, timeout=30) as client:
            for number in range(5):  # refused while the queue is short: queued like any record
                refused = await client.post("/generate", json={"prompt": 5}, headers={"X-Request-ID": f"r{number}"})
                assert refused.status_code == 422
            for number in range(40):  # accepted, over 500 bytes each: past the bound, and all kept
                answer = await client.post("/generate", json={"prompt": "ok"}, headers={"X-Request-ID": f"a{number}"})
                assert answer.status_code == 200
            for number in range(5, 205):  # over the bound: counted, not queued
                refused = await client.post("/generate", json={"prompt": 5}, headers={"X-Request-ID": f"r{number}"})
                assert refused.status_code == 422
            metrics = (await client.get("/metrics")).text
        stored_while_stuck = app.state.history.records_written
        reader.start()  # the disk comes back
    reader.join(10)

    counts = {
        line.split('"')[1]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith(SUMMARIZED + "{")
    }
    ids = [json.loads(line)["id"] for line in received[0].splitlines()]
    assert ids == [f"r{n}" for n in range(5)] + [f"a{n}" for n in range(40)]
    assert counts == {"log": 200.0, "history": 200.0}  # the history summarizes what the log did
    assert stored_while_stuck == 0  # the history waits for the log: it never holds what the log lacks
    assert stored_ids(tmp_path / "minivault.db") == sorted(ids)
    log_warnings = [r for r in caplog.records if r.name == "app.exchanges.jsonl" and "QUEUE_BYTES" in r.getMessage()]
    history_warnings = [
        r for r in caplog.records if r.name == "app.exchanges.batch_writer" and "summar" in r.getMessage()
    ]
    assert (len(log_warnings), len(history_warnings)) == (1, 1)


async def test_a_queued_exchange_cut_off_by_shutdown_is_kept_whole() -> None:
    # Queued is accepted: the client may have had `queued` events already, so its record is no refusal.
    from app.admission.slots import Admission
    from app.backends import ChatInput
    from app.core.service import GenerationService, Timeouts

    records: list[ExchangeRecord] = []
    backend: Any = SimpleNamespace(name="ollama", default_model="m")
    queued = asyncio.Event()
    admission = Admission(1, 4, on_change=lambda running, waiting: queued.set() if waiting else None)
    assert await admission.try_enter()  # the one slot is taken: the next exchange waits in the queue
    consumer = SimpleNamespace(consume=records.append)
    service = GenerationService(backend, admission, Timeouts(60, 60, None), [consumer])
    exchange = service.chat_exchange(Caller("q", "rest"), ChatInput.single("m", HUGE))
    waiting = asyncio.create_task(service.run(exchange))
    await asyncio.wait_for(queued.wait(), 5)
    assert await service.drain(0) == 1
    with pytest.raises(Exception, match="shutting down"):
        await waiting

    [record] = records
    assert (type(record), record.status, record.error.code if record.error else None) == (
        ExchangeRecord,
        "error",
        "shutting_down",
    )
    assert (record.prompt, record.prompt_chars) == (HUGE, len(HUGE))
