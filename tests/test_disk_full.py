"""A full disk (a small tmpfs holding the log and the history): answers go on and /health says the log is
failing; once space returns the log comes first, every answered exchange is in it exactly once, the file
holds whole lines only, the history matches it, and each failed line was counted once, not once per retry."""

import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import orjson
import pytest

from app.main import create_app
from tests.conftest import make_settings
from tests.support.servers import RunningServer, serve_in_thread

pytestmark = pytest.mark.anyio
BEFORE, DURING = 3, 30  # prompts answered before the disk fills, and while it is full


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs of its own, so filling it touches nothing else."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write `path` until the disk refuses another byte."""
    with path.open("wb", buffering=0) as filler:
        for size in (65536, 4096, 1):
            try:
                while filler.write(b"\0" * size):
                    pass
            except OSError:
                continue


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} is not in /metrics")


def until(condition: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def log_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


async def test_a_full_disk_loses_no_answered_exchange_splits_no_line_and_counts_each_failed_line_once(
    fake_server: RunningServer, disk: Path
) -> None:
    log_path, db_path = disk / "log.jsonl", disk / "minivault.db"
    app = create_app(make_settings(ollama_base_url=fake_server.url, log_path=log_path, db_path=db_path))
    answered: list[str] = []
    with serve_in_thread(app) as vault:
        async with httpx.AsyncClient(base_url=vault.url, timeout=30) as client:

            async def ask(request_id: str) -> None:
                answer = await client.post("/generate", json={"prompt": f"hello {request_id}"},
                                           headers={"X-Request-ID": request_id})  # fmt: skip
                assert (answer.status_code, answer.json()["response"]) == (200, f"hello {request_id}")
                answered.append(request_id)

            for number in range(BEFORE):
                await ask(f"before-{number}")
            log = app.state.interaction_log
            assert await anyio.to_thread.run_sync(log.flush, 10)
            fill(disk / "filler")

            for number in range(DURING):  # answers go on while nothing can be written
                await ask(f"during-{number}")
            health = (await client.get("/health")).json()
            for _ in range(5):  # five retries at least (each flush forces one), none of them counted again
                await anyio.to_thread.run_sync(log.flush, 10)
            failed_while_full = metric(
                (await client.get("/metrics")).text, 'minivault_log_lines_total{result="failed"}'
            )
            on_disk_while_full = log_lines(log_path)
            stored_while_full = app.state.history.records_written

            (disk / "filler").unlink()  # space comes back
            await anyio.to_thread.run_sync(until, lambda: len(log_lines(log_path)) == BEFORE + DURING, "log refilled")
            await anyio.to_thread.run_sync(log.flush, 10)
            health_after = (await client.get("/health")).json()
            metrics = (await client.get("/metrics")).text

    assert (health["log"], health_after["log"]) == ("failing", "ok")
    # While full: whole lines only (a short write was cut back to its last whole line), and the history
    # held no exchange the log lacked.
    assert b"".join(on_disk_while_full).endswith(b"\n")
    assert BEFORE <= len(on_disk_while_full) < BEFORE + DURING
    assert stored_while_full <= len(on_disk_while_full)
    lines = log_lines(log_path)
    assert all(line.endswith(b"\n") for line in lines)
    ids = [orjson.loads(line)["id"] for line in lines]  # every line is one whole record
    assert ids == answered  # each answered exchange exactly once, in order
    # The lines that failed are those written only once space came back, each counted once.
    failed = BEFORE + DURING - len(on_disk_while_full)
    assert failed_while_full == failed
    assert metric(metrics, 'minivault_log_lines_total{result="failed"}') == failed
    assert metric(metrics, 'minivault_log_lines_total{result="written"}') == BEFORE + DURING
    with sqlite3.connect(db_path) as db:
        stored = [row[0] for row in db.execute("SELECT id FROM exchanges ORDER BY rowid")]
    assert sorted(stored) == sorted(ids)
