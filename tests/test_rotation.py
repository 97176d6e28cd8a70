"""Log rotation by size (JsonlWriter with max_bytes) and reading the history back across the rotated files."""

import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.exchanges import JsonlWriter
from app.exchanges.reader import follow, last_lines, log_files, read_dicts, read_records
from app.main import create_app
from app.schemas import ExchangeRecord, read_record
from tests.conftest import make_settings
from tests.support.servers import RunningServer, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
TORN = b'{"id": "torn", "ts": "2025-01-01T00:0\n'
FOREIGN = b"[1, 2]\n"


def make_record(number: int, text: str = "") -> ExchangeRecord:
    return ExchangeRecord(
        id=f"r{number:05d}", ts=f"2025-01-01T00:{number // 60 % 60:02d}:{number % 60:02d}.000Z", endpoint="rest",
        backend="ollama", model="tinyllama:1.1b-chat", prompt=f"prompt {number} {text}", response=f"answer {number}",
        status="ok",
    )  # fmt: skip


def record_line(number: int, text: str = "") -> bytes:
    return orjson.dumps(make_record(number, text), option=orjson.OPT_APPEND_NEWLINE)


def write_batches(writer: JsonlWriter, batches: int, per_batch: int) -> list[str]:
    """Each batch is queued whole and flushed, so it reaches the file as one write."""
    ids = []
    for batch in range(batches):
        for number in range(batch * per_batch, (batch + 1) * per_batch):
            writer.write(make_record(number))
            ids.append(f"r{number:05d}")
        assert writer.flush(timeout=10)
    return ids


def rotated(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number}")


def ids_in(files: list[Path]) -> list[str]:
    return [read_record(line).id for file in files for line in file.read_bytes().splitlines()]


@pytest.mark.anyio
async def test_rotation_fills_each_file_with_whole_batches_up_to_the_limit(log_path: Path) -> None:
    limit = 2 * len(record_line(10) + record_line(11)) + 50  # two batches fit in a file, three do not
    writer = JsonlWriter(log_path, linger=0, max_bytes=limit, backups=20)
    writer.start()
    written = write_batches(writer, batches=30, per_batch=2)
    await writer.aclose()

    # What the files must hold: batches of 2 lines, a new file whenever the next batch would pass the limit.
    expected: list[bytes] = [b""]
    for batch in range(30):
        data = record_line(batch * 2) + record_line(batch * 2 + 1)
        if expected[-1] and len(expected[-1]) + len(data) > limit:
            expected.append(b"")
        expected[-1] += data
    files = log_files(log_path)
    assert len(expected) == 15
    assert files == [rotated(log_path, number) for number in range(14, 0, -1)] + [log_path]
    assert [file.read_bytes() for file in files] == expected
    assert {stat.S_IMODE(file.stat().st_mode) for file in files} == {0o600}
    assert ids_in(files) == written
    assert writer.lines_written == 60


@pytest.mark.anyio
async def test_rotation_keeps_at_most_backups_files_dropping_the_oldest(log_path: Path) -> None:
    writer = JsonlWriter(log_path, linger=0, max_bytes=1000, backups=2)
    writer.start()
    written = write_batches(writer, batches=30, per_batch=2)
    await writer.aclose()

    names = sorted(path.name for path in log_path.parent.iterdir())
    assert names == ["log.jsonl", "log.jsonl.1", "log.jsonl.2", "log.jsonl.lock"]
    assert ids_in(log_files(log_path)) == written[-6:]


@pytest.mark.anyio
async def test_a_batch_larger_than_the_limit_goes_whole_into_a_fresh_file(log_path: Path) -> None:
    writer = JsonlWriter(log_path, linger=0, max_bytes=1000, backups=5)
    writer.start()
    writer.write(make_record(1))
    assert writer.flush(timeout=10)
    writer.write(make_record(2, "x" * 2000))
    assert writer.flush(timeout=10)
    for number in (3, 4, 5):
        writer.write(make_record(number))
    assert writer.flush(timeout=10)
    writer.write(make_record(6))
    await writer.aclose()

    assert [file.read_bytes() for file in log_files(log_path)] == [
        record_line(1), record_line(2, "x" * 2000), record_line(3) + record_line(4) + record_line(5), record_line(6)
    ]  # fmt: skip


@pytest.mark.anyio
async def test_without_max_bytes_the_log_never_rotates(log_path: Path) -> None:
    writer = JsonlWriter(log_path, linger=0)
    writer.start()
    written = write_batches(writer, batches=10, per_batch=5)
    await writer.aclose()

    assert [path.name for path in log_path.parent.iterdir()] == ["log.jsonl"]
    assert ids_in([log_path]) == written


WRITER_PROCESS = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from app.exchanges import JsonlWriter
    from app.schemas import ExchangeRecord

    path, start = Path(sys.argv[1]), int(sys.argv[2])
    writer = JsonlWriter(path, linger=0, max_bytes=6000, backups=200)
    writer.start()
    print("ready", flush=True)
    sys.stdin.readline()
    for batch in range(100):
        for number in range(start + batch * 2, start + batch * 2 + 2):
            writer.write(ExchangeRecord(id=f"r{number:05d}", ts="2025-01-01T00:00:00.000Z", endpoint="rest",
                                        backend="ollama", prompt="p" * 300, status="ok"))
        assert writer.flush(timeout=10)
    print(writer.lines_written, writer.lines_dropped, writer.failing, flush=True)
    """
)


def test_two_processes_rotating_one_log_lose_and_split_nothing(log_path: Path) -> None:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER_PROCESS, str(log_path), str(start)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for start in (0, 10_000)
    ]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        for process in processes:  # both go at once
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        outcomes = [process.communicate(timeout=60)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert outcomes == ["200 0 False\n", "200 0 False\n"]

    files = log_files(log_path)
    assert len(files) > 20
    assert all(file.read_bytes().endswith(b"\n") and file.stat().st_size <= 6000 for file in files)
    ids = ids_in(files)
    # Every line whole, none lost, and each process's lines in its own order across the files.
    assert [record for record in ids if record < "r10000"] == [f"r{n:05d}" for n in range(200)]
    assert [record for record in ids if record >= "r10000"] == [f"r{n:05d}" for n in range(10_000, 10_200)]


def test_the_app_rotates_its_log_as_configured(fake_server: RunningServer, log_path: Path) -> None:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, db_path=log_path.parent / "db",
                             log_max_bytes=1000, log_backups=2)  # fmt: skip
    with serve_in_thread(create_app(settings)) as server:
        ids = [httpx.post(f"{server.url}/generate", json={"prompt": f"rotate me {n}"}).json()["id"] for n in range(12)]
        assert server.server.config.app.state.interaction_log.flush(timeout=10)

    files = log_files(log_path)
    assert files == [rotated(log_path, 2), rotated(log_path, 1), log_path]
    assert all(file.stat().st_size <= 1000 for file in files)
    kept = [record.id for record in read_records(log_path)]
    assert 3 <= len(kept) < 12
    assert kept == ids[-len(kept) :]


def write_rotated_history(path: Path) -> None:
    """Oldest first: log.jsonl.2 (r0, r1); .1 (r2, a torn line, r3, a blank line, a foreign line); log.jsonl (r4)."""
    path.parent.mkdir(parents=True)
    rotated(path, 2).write_bytes(record_line(0) + record_line(1))
    rotated(path, 1).write_bytes(record_line(2) + TORN + record_line(3) + b"\n" + FOREIGN)
    path.write_bytes(record_line(4))


def test_history_reads_every_rotated_file_oldest_first_skipping_bad_lines(log_path: Path) -> None:
    write_rotated_history(log_path)
    for name in ("log.jsonl.lock", "log.jsonl.bak", "log.jsonl.1.gz", "other.jsonl.3"):
        (log_path.parent / name).write_bytes(record_line(99))
    skipped: list[bytes] = []

    records = list(read_records(log_path, skipped.append))

    assert [record.id for record in records] == ["r00000", "r00001", "r00002", "r00003", "r00004"]
    assert records[4] == make_record(4)
    assert skipped == [TORN, FOREIGN]


def test_records_must_validate_but_printed_lines_need_only_be_json_objects(log_path: Path) -> None:
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(record_line(1) + b'{"hello": "world"}\n' + TORN + record_line(2))
    skipped_records: list[bytes] = []
    skipped_dicts: list[bytes] = []

    records = [record.id for record in read_records(log_path, skipped_records.append)]
    dicts = list(read_dicts(log_path, skipped_dicts.append))

    assert records == ["r00001", "r00002"]
    assert skipped_records == [b'{"hello": "world"}\n', TORN]
    assert [record.get("id") for record in dicts] == ["r00001", None, "r00002"]
    assert skipped_dicts == [TORN]


def test_last_lines_reach_into_the_rotated_files(log_path: Path) -> None:
    write_rotated_history(log_path)
    size = log_path.stat().st_size

    assert last_lines(log_path, 0) == ([], size)
    assert last_lines(log_path, 1) == ([record_line(4).rstrip()], size)
    every = [record_line(0), record_line(1), record_line(2), TORN, record_line(3), FOREIGN, record_line(4)]
    assert last_lines(log_path, 4) == ([line.rstrip() for line in every[-4:]], size)
    assert last_lines(log_path, 100) == ([line.rstrip() for line in every], size)


@pytest.mark.anyio
async def test_follow_reads_the_lines_written_just_before_a_rotation(log_path: Path) -> None:
    writer = JsonlWriter(log_path, linger=0, max_bytes=2 * len(record_line(1)), backups=2)
    writer.start()
    writer.write(make_record(1))
    assert writer.flush(timeout=10)
    _, end = last_lines(log_path, 0)
    lines = follow(log_path, end, interval=0.01)
    try:
        writer.write(make_record(2))
        assert writer.flush(timeout=10)
        writer.write(make_record(3))
        assert writer.flush(timeout=10)
        assert ids_in([rotated(log_path, 1)]) == ["r00001", "r00002"]

        assert [next(lines), next(lines)] == [record_line(2).rstrip(), record_line(3).rstrip()]
        writer.write(make_record(4))
        assert writer.flush(timeout=10)
        assert next(lines) == record_line(4).rstrip()
    finally:
        lines.close()
        await writer.aclose()


def test_logs_tail_reads_the_rotated_files_too(log_path: Path) -> None:
    write_rotated_history(log_path)

    result = runner.invoke(cli, ["logs", "-n", "4", "--json", "--path", str(log_path)])

    assert result.exit_code == 0
    assert [orjson.loads(line)["id"] for line in result.stdout.splitlines()] == ["r00003", "r00004"]
    assert result.stderr.splitlines() == [
        f"minivault: skipping a line that is not JSON: {TORN.rstrip()!r}",
        f"minivault: skipping a line that is not JSON: {FOREIGN.rstrip()!r}",
    ]
