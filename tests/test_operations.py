"""Operating MiniVault: a SIGKILL mid-load, torn log lines, the JSON server log, /metrics (one and two workers)."""

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from typer.testing import CliRunner
from websockets.asyncio.client import ClientConnection, connect

from app.cli import cli
from app.main import create_app
from app.schemas import ExchangeRecord, read_record
from tests.conftest import closed_port_url, make_settings
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, bound_socket, serve_in_thread
from tests.support.sse import aparse_events

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "tinyllama:1.1b-chat"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@contextmanager
def minivault_process(env: dict[str, str], *options: str) -> Iterator[tuple[subprocess.Popen[bytes], str, IO[bytes]]]:
    """`uvicorn app.main:app` on a loopback socket bound here; yields the process, its URL and its stderr file."""
    sock = bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # A file, not a pipe: nobody reads stderr while the server runs.
    output = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--fd", str(sock.fileno()), *options],
        cwd=ROOT, env={**os.environ, "MINIVAULT_BACKEND": "ollama", **env}, pass_fds=[sock.fileno()], stderr=output,
    )  # fmt: skip
    # The server has its own copy; once it dies, connecting is refused instead of waiting in our backlog.
    sock.close()
    try:
        yield process, url, output
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        output.close()


def read_output(output: IO[bytes]) -> str:
    output.seek(0)
    return output.read().decode()


async def wait_for_log_lines(path: Path, count: int) -> None:
    """Poll the log another process writes until it holds `count` lines (30 s at most)."""
    log = anyio.Path(path)
    with anyio.fail_after(30):
        while True:
            if await log.exists() and (await log.read_bytes()).count(b"\n") >= count:
                return
            await anyio.sleep(0.005)  # another process writes it: nothing to wait on but the file


def record_line(record_id: str, prompt: str) -> bytes:
    record = ExchangeRecord(id=record_id, ts="2026-01-02T03:04:05.000Z", endpoint="rest", backend="ollama",
                            model=DEFAULT_MODEL, prompt=prompt, response=prompt, status="ok")  # fmt: skip
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


class Collected(logging.Handler):
    """The records one logger emits, whatever the other tests did to propagation."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def collected(name: str) -> Iterator[list[logging.LogRecord]]:
    handler = Collected()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def scrape(url: str, **headers: str) -> list[Sample]:
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == PROMETHEUS_TEXT
    return [sample for family in text_string_to_metric_families(response.text) for sample in family.samples]


def series(samples: list[Sample], name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """The samples called `name`, keyed by the values of `labels` (in that order)."""
    return {tuple(sample.labels[label] for label in labels): sample.value for sample in samples if sample.name == name}


async def test_sigkill_under_load_leaves_whole_lines_and_at_most_one_torn_last_line(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    fake.delay = 0.005
    env = {"OLLAMA_BASE_URL": fake_server.url, "MINIVAULT_LOG_PATH": str(log_path), "MINIVAULT_MAX_CONCURRENCY": "32"}
    with minivault_process(env, "--log-level", "warning", "--no-access-log") as (process, url, _):
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=32), timeout=30) as client:

            async def one(index: int) -> int | None:
                try:
                    response = await client.post("/generate", json={"prompt": f"load {index} " + "word " * 10})
                except httpx.TransportError:
                    return None  # the server was killed under this request
                return response.status_code

            load = asyncio.gather(*(one(index) for index in range(300)))
            await wait_for_log_lines(log_path, 10)
            process.kill()
            statuses = await load
        assert process.wait(timeout=30) == -signal.SIGKILL

    answered = [status for status in statuses if status is not None]
    assert set(answered) == {200}
    assert len(answered) < 300, "the kill came after the load had ended"
    *lines, last = (await anyio.Path(log_path).read_bytes()).split(b"\n")
    records = [read_record(line) for line in lines]
    assert len(records) >= 10
    assert len({record.id for record in records}) == len(records)
    assert len({record.prompt for record in records}) == len(records)
    assert {record.status for record in records} == {"ok"}
    assert all((record.prompt or "").startswith("load ") for record in records)
    # Whatever the kill left after the last newline is the start of one more record, or nothing.
    assert last == b"" or last.startswith(b'{"id":')


def test_a_torn_last_line_is_ended_before_the_next_record(fake_server: RunningServer, log_path: Path) -> None:
    old = record_line("old", "before the crash")
    torn = b'{"id": "torn", "ts": "2026-'
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(old + torn)
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path)

    with collected("app.exchanges.jsonl") as records, serve_in_thread(create_app(settings)) as minivault:
        answer = httpx.post(f"{minivault.url}/generate", json={"prompt": "after the crash"}, timeout=30)
        minivault.stop()

    assert answer.status_code == 200
    first, fragment, new, end = log_path.read_bytes().split(b"\n")
    assert (first + b"\n", fragment, end) == (old, torn, b"")
    record = read_record(new)
    assert (record.id, record.prompt, record.status) == (answer.json()["id"], "after the crash", "ok")
    assert [(record.levelname, record.getMessage()) for record in records] == [
        ("WARNING", "interaction log ends with a torn line (a killed writer?); starting a new line after it")
    ]


def test_logs_and_logs_search_skip_torn_lines_with_one_warning_each(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    ended = b'{"id": "torn", "ts": "2026-'
    cut = b'{"id": "cut", "endpoint": "re'
    path.write_bytes(record_line("r1", "red apple") + ended + b"\n" + record_line("r2", "green apple") + cut)
    warnings = "".join(f"minivault: skipping a line that is not JSON: {line!r}\n" for line in (ended, cut))
    runner = CliRunner()

    tail = runner.invoke(cli, ["logs", "--path", str(path)])
    nowhere = closed_port_url()  # no MiniVault to ask: search reads the files
    found = runner.invoke(cli, ["logs", "search", "apple", "--json", "--path", str(path), "--url", nowhere])

    assert tail.exit_code == 0
    prompts = [line for line in tail.stdout.splitlines() if line.startswith("  > ")]
    assert prompts == ["  > red apple", "  > green apple"]
    assert tail.stderr == warnings
    assert found.exit_code == 0
    assert [json.loads(line)["id"] for line in found.stdout.splitlines()] == ["r1", "r2"]
    assert found.stderr == f"minivault: MiniVault is not reachable at {nowhere}; searching the log files\n" + warnings


def test_json_server_log_is_one_object_per_line_with_the_request_id_on_the_access_line(
    fake_server: RunningServer, log_path: Path
) -> None:
    env = {"OLLAMA_BASE_URL": fake_server.url, "MINIVAULT_LOG_PATH": str(log_path), "MINIVAULT_LOG_FORMAT": "json"}
    with minivault_process(env, "--log-level", "info") as (process, url, output):
        response = httpx.post(
            f"{url}/generate", json={"prompt": "json log"}, headers={"X-Request-ID": "abc-123"}, timeout=30
        )
        process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        stderr = read_output(output)

    assert response.status_code == 200
    assert response.headers["x-request-id"] == "abc-123"
    lines: list[dict[str, Any]] = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert all(isinstance(line, dict) and {"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    [access] = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert '"POST /generate HTTP/1.1" 200' in access["message"]
    assert (access["level"], access["request_id"]) == ("info", "abc-123")
    [startup] = [line for line in lines if line["message"].startswith("auth is off")]
    assert (startup["logger"], startup["level"]) == ("app", "info")
    assert "request_id" not in startup


async def test_metrics_count_every_kind_of_exchange_exactly(minivault: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=minivault.url, timeout=30) as client:
        for prompt in ("one", "one two", "one two three"):
            assert (await client.post("/generate", json={"prompt": prompt})).status_code == 200
        for prompt in ("a b c d", "e f"):
            async with client.stream("POST", "/generate", json={"prompt": prompt, "stream": True}) as response:
                events = [name async for name, _ in aparse_events(response)]
            assert events[-1] == "done"
        missing = await client.post("/generate", json={"prompt": "hi", "model": "absent"})
        invalid = await client.post("/generate", json={"promt": "typo"})
    async with connect(f"{minivault.ws_url}/ws/generate") as ws:
        await ws.send(json.dumps({"prompt": "w x y"}))
        frames = await frames_until_end(ws)
    log = minivault.server.config.app.state.interaction_log
    assert log.flush(timeout=10)
    samples = scrape(minivault.url)

    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "model_not_found")
    assert (invalid.status_code, invalid.json()["error"]["code"]) == (422, "invalid_request")
    assert frames[-1]["type"] == "done"
    assert series(samples, "minivault_requests_total", "endpoint", "status", "model") == {
        ("rest", "200", DEFAULT_MODEL): 3, ("sse", "200", DEFAULT_MODEL): 2, ("ws", "200", DEFAULT_MODEL): 1,
        # A model that never served an answer is not a label value of its own.
        ("rest", "404", "other"): 1, ("rest", "422", DEFAULT_MODEL): 1,
    }  # fmt: skip
    tokens = series(samples, "minivault_tokens_generated_total", "model")
    assert tokens[(DEFAULT_MODEL,)] == sum(tokens.values()) == 1 + 2 + 3 + 4 + 2 + 3
    assert series(samples, "minivault_in_flight") == {(): 0}
    assert series(samples, "minivault_queued") == {(): 0}
    for histogram in ("minivault_time_to_first_token_seconds", "minivault_upstream_latency_seconds"):
        counts = series(samples, f"{histogram}_count", "model")
        assert counts[(DEFAULT_MODEL,)] == sum(counts.values()) == 6
    lines = log.path.read_bytes().count(b"\n")
    assert lines == 8
    assert series(samples, "minivault_log_lines_total", "result") == {("written",): lines, ("failed",): 0}


async def frames_until_end(ws: ClientConnection) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(json.loads(await ws.recv(decode=True)))
    return frames


async def test_metrics_gauges_show_one_running_and_one_queued_answer(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, max_concurrency=1)
    slow = json.dumps({"prompt": "x", "model": "slow"})
    with serve_in_thread(create_app(settings)) as minivault:
        async with (
            connect(f"{minivault.ws_url}/ws/generate") as first,
            connect(f"{minivault.ws_url}/ws/generate") as second,
        ):
            await first.send(slow)
            assert [json.loads(await first.recv(decode=True))["type"] for _ in range(2)] == ["start", "token"]
            await second.send(slow)
            queued = [json.loads(await second.recv(decode=True)) for _ in range(2)][1]
            assert queued == {"type": "queued", "position": 1}
            busy = scrape(minivault.url)
            assert fake.started == 1
            # A cancelled answer's `done` frame comes after the exchange has finished (and been counted).
            for ws in (first, second):
                await ws.send(json.dumps({"type": "cancel"}))
                assert (await frames_until_end(ws))[-1]["done_reason"] == "cancelled"
        idle = scrape(minivault.url)

    assert (series(busy, "minivault_in_flight"), series(busy, "minivault_queued")) == ({(): 1}, {(): 1})
    assert (series(idle, "minivault_in_flight"), series(idle, "minivault_queued")) == ({(): 0}, {(): 0})
    assert series(idle, "minivault_requests_total", "endpoint", "status", "model") == {("ws", "499", "other"): 2}


def test_metrics_need_the_api_key_when_keys_are_set(fake_server: RunningServer, log_path: Path) -> None:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, api_keys="sekrit")
    with serve_in_thread(create_app(settings)) as minivault:
        refused = httpx.get(f"{minivault.url}/metrics", timeout=30)
        samples = scrape(minivault.url, authorization="Bearer sekrit")

    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "unauthorized")
    assert series(samples, "minivault_refused_requests_total", "code") == {("unauthorized",): 1}


async def test_two_workers_report_the_sum_of_their_counts(
    fake_server: RunningServer, fake: FakeOllama, tmp_path: Path
) -> None:
    fake.delay = 0.01
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    env = {"OLLAMA_BASE_URL": fake_server.url, "MINIVAULT_LOG_PATH": str(tmp_path / "log.jsonl"),
           "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}  # fmt: skip
    with minivault_process(env, "--workers", "2", "--log-level", "warning") as (process, url, output):
        # No keep-alive, and 8 at a time: each request is a new connection, which either worker may accept.
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.post("/generate", json={"prompt": f"worker {index} a b c"}) for index in range(40))
            )
        statuses = [response.status_code for response in responses]
        scrapes = [await anyio.to_thread.run_sync(scrape, url) for _ in range(4)]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM), read_output(output)

    assert statuses == [200] * 40
    for samples in scrapes:
        assert series(samples, "minivault_requests_total", "endpoint", "status", "model") == {
            ("rest", "200", DEFAULT_MODEL): 40
        }
