"""The CLI over the history: `logs reindex` into the database, `logs search` through the API or the files,
and the one-line setup hint when the CLI runs on a Python without its dependencies."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from typer.testing import CliRunner

from app.cli import cli
from app.main import create_app
from app.schemas import ExchangeRecord, LoggedError
from tests.conftest import closed_port_url, make_settings
from tests.support.servers import RunningServer, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
TORN = b'{"id": "torn", "ts": "2025-01-0\n'
FOREIGN = b'{"hello": "world"}\n'


def record(number: int, **fields: Any) -> ExchangeRecord:
    values: dict[str, Any] = {
        "id": f"r{number:03d}", "ts": f"2025-01-0{1 + number // 10}T12:00:{number % 60:02d}.000Z", "endpoint": "rest",
        "backend": "ollama", "model": "tinyllama:1.1b-chat", "prompt": f"prompt {number} about apples",
        "response": f"answer {number}", "status": "ok",
    }  # fmt: skip
    return ExchangeRecord(**{**values, **fields})


def line(item: ExchangeRecord) -> bytes:
    return orjson.dumps(item, option=orjson.OPT_APPEND_NEWLINE)


def write_log(path: Path, files: list[list[bytes]]) -> None:
    """`files` oldest first: the last one is log.jsonl, the ones before it log.jsonl.N ... .1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for age, lines in enumerate(reversed(files)):
        (path if age == 0 else path.with_name(f"{path.name}.{age}")).write_bytes(b"".join(lines))


def history_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as connection:
        return [row[0] for row in connection.execute("SELECT id FROM exchanges ORDER BY id")]


def test_reindex_twice_adds_each_record_once_from_every_rotated_file(log_path: Path, tmp_path: Path) -> None:
    db = tmp_path / "db" / "minivault.db"
    # r2 twice: a batch retried after a failed write can repeat lines.
    write_log(log_path, [[line(record(0)), line(record(1))],
                         [line(record(2)), TORN, line(record(3)), b"\n", FOREIGN],
                         [line(record(4)), line(record(2))]])  # fmt: skip
    args = ["logs", "reindex", "--path", str(log_path), "--db", str(db)]

    first = runner.invoke(cli, args)
    second = runner.invoke(cli, args)

    assert (first.exit_code, first.stdout) == (0, "6 records read, 5 new, 2 lines skipped\n")
    assert first.stderr.splitlines()[:2] == [
        f"minivault: skipping a line that is not an exchange record: {TORN.rstrip()!r}",
        f"minivault: skipping a line that is not an exchange record: {FOREIGN.rstrip()!r}",
    ]
    total = sum(file.stat().st_size for file in log_path.parent.iterdir())
    assert f"{total / 1000:.1f}/{total / 1000:.1f} kB 100%" in first.stderr.splitlines()[-1]
    assert (second.exit_code, second.stdout) == (0, "6 records read, 0 new, 2 lines skipped\n")
    assert history_ids(db) == ["r000", "r001", "r002", "r003", "r004"]


def test_reindex_adds_what_the_log_gained_since_and_reads_the_environment(log_path: Path, tmp_path: Path) -> None:
    db = tmp_path / "minivault.db"
    env = {"MINIVAULT_LOG_PATH": str(log_path), "MINIVAULT_DB_PATH": str(db)}
    write_log(log_path, [[line(record(number)) for number in range(3)]])
    first = runner.invoke(cli, ["logs", "reindex"], env=env)
    write_log(log_path, [[line(record(number)) for number in range(3)], [line(record(3)), line(record(4))]])

    second = runner.invoke(cli, ["logs", "reindex"], env=env)

    assert first.stdout == "3 records read, 3 new, 0 lines skipped\n"
    assert second.stdout == "5 records read, 2 new, 0 lines skipped\n"
    assert history_ids(db) == ["r000", "r001", "r002", "r003", "r004"]


def test_reindex_fills_the_database_beside_the_log_where_the_server_keeps_it(log_path: Path) -> None:
    write_log(log_path, [[line(record(1)), line(record(2))]])

    result = runner.invoke(cli, ["logs", "reindex"], env={"MINIVAULT_LOG_PATH": str(log_path)})

    assert result.stdout == "2 records read, 2 new, 0 lines skipped\n"
    assert make_settings(log_path=log_path).db_path == log_path.parent / "minivault.db"
    assert history_ids(log_path.parent / "minivault.db") == ["r001", "r002"]


def test_reindex_without_a_log_says_where_it_looked(tmp_path: Path) -> None:
    missing = tmp_path / "none.jsonl"
    result = runner.invoke(cli, ["logs", "reindex", "--path", str(missing), "--db", str(tmp_path / "db")])

    assert result.exit_code == 1
    assert result.stderr == f"minivault: no interaction log at {missing} yet (set --path or MINIVAULT_LOG_PATH)\n"
    assert not (tmp_path / "db").exists()


def write_varied_log(path: Path) -> None:
    write_log(path, [
        [line(record(1)), line(record(2, model="llama3")), line(record(3, status="error", response=None,
                                                                        error=LoggedError("upstream_failed", "boom")))],
        [line(record(11, endpoint="ws")), TORN, line(record(12, prompt="nothing to see")), line(record(13))],
        [line(record(21)), line(record(22, endpoint="sse", prompt="more APPLES"))],
    ])  # fmt: skip


def test_search_reads_the_rotated_files_when_minivault_is_unreachable(log_path: Path) -> None:
    write_varied_log(log_path)
    url = closed_port_url()
    base = ["logs", "search", "apples", "--json", "--url", url, "--path", str(log_path)]

    def ids(*args: str) -> list[str]:
        result = runner.invoke(cli, [*base, *args])
        assert result.exit_code == 0, result.stderr
        assert result.stderr.splitlines() == [
            f"minivault: MiniVault is not reachable at {url}; searching the log files",
            f"minivault: skipping a line that is not JSON: {TORN.rstrip()!r}",
        ]
        return [orjson.loads(printed)["id"] for printed in result.stdout.splitlines()]

    assert ids() == ["r001", "r002", "r003", "r011", "r013", "r021", "r022"]
    assert ids("-n", "2") == ["r021", "r022"]
    assert ids("--model", "llama3") == ["r002"]
    assert ids("--status", "error") == ["r003"]
    assert ids("--endpoint", "ws") == ["r011"]
    assert ids("--since", "2025-01-02T12:00:13Z", "--until", "2025-01-03T12:00:22") == ["r013", "r021"]
    assert ids("--since", "2025-01-02T13:00:00+01:00") == ["r011", "r013", "r021", "r022"]
    missing = runner.invoke(cli, [*base, "--status", "cancelled"])
    assert (missing.exit_code, missing.stderr.splitlines()[-1]) == (1, "minivault: no exchange mentions 'apples'")


def test_search_refuses_a_time_that_is_not_iso(log_path: Path) -> None:
    result = runner.invoke(cli, ["logs", "search", "x", "--since", "yesterday", "--path", str(log_path)])

    assert result.exit_code == 2
    assert "'yesterday' is not an ISO date or time" in result.stderr


def history_stub(pages: list[list[dict[str, Any]]], seen: list[tuple[dict[str, str], str | None]]) -> Starlette:
    """GET /history answering `pages` in turn, its cursor the next page's index."""

    async def history(request: Request) -> JSONResponse:
        seen.append((dict(request.query_params), request.headers.get("authorization")))
        index = int(request.query_params.get("cursor", 0))
        next_cursor = str(index + 1) if index + 1 < len(pages) else None
        return JSONResponse({"items": pages[index], "next_cursor": next_cursor})

    return Starlette(routes=[Route("/history", history)])


def test_search_asks_the_api_with_the_filters_and_follows_the_cursor(log_path: Path) -> None:
    pages = [[{"id": "a", "prompt": "x"}, {"id": "b"}], [{"id": "c"}, {"id": "d"}], [{"id": "e"}]]
    seen: list[tuple[dict[str, str], str | None]] = []
    with serve_in_thread(history_stub(pages, seen), lifespan="off") as server:
        result = runner.invoke(cli, [
            "logs", "search", "apple pie", "-n", "3", "--model", "llama3", "--status", "ok", "--endpoint", "sse",
            "--since", "2025-01-01", "--until", "2025-01-02T12:00:00+02:00", "--url", server.url, "--json",
        ], env={"MINIVAULT_API_KEY": "secret"})  # fmt: skip
        everything = runner.invoke(cli, ["logs", "search", "pie", "--url", server.url, "--json"])

    assert result.exit_code == 0
    assert result.stderr == f"minivault: searching the history of MiniVault at {server.url}\n"
    assert [orjson.loads(printed) for printed in result.stdout.splitlines()] == [{"id": "a", "prompt": "x"},
                                                                                 {"id": "b"}, {"id": "c"}]  # fmt: skip
    filters = {"q": "apple pie", "model": "llama3", "status": "ok", "endpoint": "sse",
               "since": "2025-01-01T00:00:00+00:00", "until": "2025-01-02T12:00:00+02:00"}  # fmt: skip
    assert seen[:2] == [({**filters, "limit": "3"}, "Bearer secret"), ({**filters, "limit": "1", "cursor": "1"}, "Bearer secret")]  # fmt: skip  # noqa: E501
    assert [printed["id"] for printed in map(orjson.loads, everything.stdout.splitlines())] == ["a", "b", "c", "d", "e"]
    assert [query for query, _ in seen[2:]] == [{"q": "pie", "limit": "50"}, {"q": "pie", "limit": "48", "cursor": "1"},
                                                {"q": "pie", "limit": "46", "cursor": "2"}]  # fmt: skip
    assert len(seen) == 5


def test_search_reads_the_files_when_minivault_has_no_history_api(log_path: Path) -> None:
    write_log(log_path, [[line(record(1))]])
    with serve_in_thread(_old_minivault(), lifespan="off") as server:
        result = runner.invoke(
            cli, ["logs", "search", "apples", "--json", "--url", server.url, "--path", str(log_path)]
        )

    assert result.exit_code == 0
    assert result.stderr == f"minivault: MiniVault at {server.url} has no history API; searching the log files\n"
    assert [orjson.loads(printed)["id"] for printed in result.stdout.splitlines()] == ["r001"]


def _old_minivault() -> Starlette:
    async def not_found(request: Request) -> JSONResponse:
        error = {"code": "route_not_found", "message": "no route GET /history", "id": "x"}
        return JSONResponse({"error": error}, status_code=404)

    return Starlette(routes=[Route("/history", not_found)])


def test_search_through_minivault_finds_what_it_answered(
    fake_server: RunningServer, log_path: Path, tmp_path: Path
) -> None:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, db_path=tmp_path / "minivault.db")
    with serve_in_thread(create_app(settings)) as server:
        for prompt in ("first apple", "second banana", "third cherry"):
            assert httpx.post(f"{server.url}/generate", json={"prompt": prompt}).status_code == 200
        assert server.server.config.app.state.history.flush(timeout=10)

        found = runner.invoke(cli, ["logs", "search", "banana", "--json", "--url", server.url])
        by_status = runner.invoke(cli, ["logs", "search", "cherry", "--status", "error", "--url", server.url])

    assert found.exit_code == 0
    assert found.stderr == f"minivault: searching the history of MiniVault at {server.url}\n"
    [item] = [orjson.loads(printed) for printed in found.stdout.splitlines()]
    assert (item["prompt"], item["response"], item["status"]) == ("second banana", "second banana", "ok")
    assert (by_status.exit_code, by_status.stderr.splitlines()[-1]) == (1, "minivault: no exchange mentions 'cherry'")


def test_search_through_minivault_needs_its_api_key(fake_server: RunningServer, log_path: Path) -> None:
    settings = make_settings(
        ollama_base_url=fake_server.url, log_path=log_path, db_path=log_path.parent / "minivault.db", api_keys="k"
    )
    with serve_in_thread(create_app(settings)) as server:
        result = runner.invoke(cli, ["logs", "search", "x", "--url", server.url])

    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("minivault: unauthorized: an API key is required")
    assert result.stderr.endswith("pass it with --api-key or MINIVAULT_API_KEY\n")


def test_a_python_without_the_dependencies_gets_one_line_on_how_to_set_up() -> None:
    # -S: no site-packages, like the system Python of the original brief; -E -s: nothing from the environment.
    result = subprocess.run([sys.executable, "-S", "-E", "-s", "app/cli.py", "Explain photosynthesis"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]})  # fmt: skip

    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"minivault: {sys.executable} has no 'typer' module: run `make run` (or `make test`) once to set up .venv, "
        "then use `.venv/bin/python app/cli.py ...`, `.venv/bin/minivault ...` (installed by `make test`) "
        "or `source .venv/bin/activate` first\n"
    )
