"""The interaction log's guarantees: one line per exchange, never blocking the loop, nothing lost."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from app.exchanges import JsonlWriter
from app.main import create_app
from tests.conftest import make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, bound_socket, serve_in_thread

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent


async def test_writer_creates_the_folder_and_flushes_on_close(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "log.jsonl"
    writer = JsonlWriter(path)
    writer.start()
    for index in range(1000):
        writer.write({"n": index, "text": "héllo 🌍"})
    await writer.aclose()

    lines = read_log(path)
    assert [line["n"] for line in lines] == list(range(1000))
    assert lines[0]["text"] == "héllo 🌍"
    assert writer.lines_written == 1000


async def test_event_loop_never_waits_on_the_disk(tmp_path: Path) -> None:
    # A FIFO with no reader makes the writer's open() block, like a stalled disk.
    path = tmp_path / "stalled.jsonl"
    os.mkfifo(path)
    writer = JsonlWriter(path)
    writer.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    for index in range(500):
        writer.write({"n": index})
        await asyncio.sleep(0)
    # All 500 writes returned and the loop kept scheduling other work while the disk was stuck.
    assert ticks >= 500
    task.cancel()

    def drain() -> bytes:
        with open(path, "rb") as fifo:
            return fifo.read()

    async with anyio.create_task_group() as group:
        received: list[bytes] = []
        group.start_soon(lambda: _collect(received, drain))
        await writer.aclose()
    assert [json.loads(line)["n"] for line in received[0].splitlines()] == list(range(500))


async def _collect(into: list[bytes], read: object) -> None:
    into.append(await anyio.to_thread.run_sync(read))  # type: ignore[arg-type]


async def test_failed_writes_are_reported_and_retried(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log folder should be")
    writer = JsonlWriter(blocker / "log.jsonl")
    writer.start()
    writer.write({"n": 1})
    assert await anyio.to_thread.run_sync(writer.flush, 10)
    assert writer.state == "failing"
    assert "NotADirectoryError" in (writer.last_error or "")

    blocker.unlink()
    writer.write({"n": 2})
    await writer.aclose()
    assert writer.state == "ok"
    assert [line["n"] for line in read_log(blocker / "log.jsonl")] == [1, 2]


async def test_rotated_or_deleted_log_is_recreated(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    writer = JsonlWriter(path)
    writer.start()
    writer.write({"n": 1})
    assert await anyio.to_thread.run_sync(writer.flush, 10)
    path.rename(tmp_path / "log.jsonl.1")  # what logrotate does
    writer.write({"n": 2})
    assert await anyio.to_thread.run_sync(writer.flush, 10)
    path.unlink()
    writer.write({"n": 3})
    await writer.aclose()

    assert [line["n"] for line in read_log(tmp_path / "log.jsonl.1")] == [1]
    assert [line["n"] for line in read_log(path)] == [3]


async def test_200_concurrent_requests_leave_200_whole_lines(fake_server: RunningServer, log_path: Path) -> None:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, max_queue=200)
    with serve_in_thread(create_app(settings)) as minivault:
        await _200_requests(minivault, log_path)


async def _200_requests(minivault: RunningServer, log_path: Path) -> None:
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=minivault.url, limits=limits, timeout=60) as client:

        async def one(index: int) -> str:
            response = await client.post("/generate", json={"prompt": f"request {index} " + "word " * 20})
            assert response.status_code == 200
            return response.json()["id"]

        ids = await asyncio.gather(*(one(index) for index in range(200)))

    await anyio.to_thread.run_sync(minivault.stop)
    lines = read_log(log_path)
    assert len(lines) == 200
    assert sorted(line["id"] for line in lines) == sorted(ids)
    for line in lines:
        index = line["prompt"].split()[1]
        assert line["response"] == f"request {index} " + "word " * 20


async def test_sigterm_finishes_in_flight_answers_and_cuts_off_the_rest_after_the_grace(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    fake.delay = 0.05
    sock = bound_socket()
    env = {**os.environ, "OLLAMA_BASE_URL": fake_server.url, "MINIVAULT_LOG_PATH": str(log_path),
           "MINIVAULT_MAX_CONCURRENCY": "32", "MINIVAULT_SHUTDOWN_GRACE": "1.5"}  # fmt: skip
    server = subprocess.Popen(  # noqa: ASYNC220 - started once; the loop has nothing else to do yet
        [sys.executable, "-m", "uvicorn", "app.main:app", "--fd", str(sock.fileno()), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        pass_fds=[sock.fileno()],
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def one(index: int) -> int:
                response = await client.post("/generate", json={"prompt": f"in flight {index} a b c d"})
                return response.status_code

            async with connect(url.replace("http", "ws") + "/ws/generate") as ws:
                await ws.send(json.dumps({"prompt": "x", "model": "slow"}))
                requests = asyncio.gather(*(one(index) for index in range(20)))
                await anyio.to_thread.run_sync(lambda: fake.wait_until(lambda f: f.started == 21, 30))
                server.send_signal(signal.SIGTERM)
                statuses = await requests
                # The 400-token websocket answer (8 s) cannot finish within the 1.5 s grace.
                frames = [json.loads(frame) async for frame in ws]
                close_code = ws.close_code
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        server.kill()
        sock.close()
        output = server.stderr.read().decode() if server.stderr else ""
        if server.stderr:
            server.stderr.close()

    assert statuses == [200] * 20
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "shutting_down"
    assert "MINIVAULT_SHUTDOWN_GRACE" in frames[-1]["message"]
    assert close_code == 1001
    lines = read_log(log_path)
    assert len(lines) == 21
    by_endpoint = sorted((line["endpoint"], line["status"], (line["error"] or {}).get("code")) for line in lines)
    assert by_endpoint == [("rest", "ok", None)] * 20 + [("ws", "error", "shutting_down")]
    assert "cut off 1 answers" in output


def test_startup_stops_with_one_line_naming_a_bad_setting(tmp_path: Path) -> None:
    env = {**os.environ, "OLLAMA_BASE_URL": "localhost:11434", "MINIVAULT_READ_TIMEOUT": "-5"}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert time.monotonic() - started < 60
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("minivault: invalid setting OLLAMA_BASE_URL='localhost:11434'")
    assert "MINIVAULT_READ_TIMEOUT='-5'" in line
