"""The CLI never hands a terminal the control characters of text it did not write: a prompt (or a model's answer,
a conversation's title, an error message) holding escapes is shown with them as visible `\\xNN`, on a pipe and on a
terminal alike, and `--json` keeps the exact values. Also: `logs search --endpoint` takes every endpoint the API does.

The attack: a prompt that retitles the terminal, clears the screen, homes the cursor and prints a fake "all ok",
then a one-character C1 CSI and a DEL. The CLI runs as a subprocess, as a user types it.
"""

import json
import os
import pty
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import httpx
import pytest
from typer.testing import CliRunner

from app.cli import cli as app
from app.main import create_app
from app.schemas import Endpoint
from tests.conftest import closed_port_url, make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
EVIL = "\x1b]0;pwned\x07\x1b[2J\x1b[1;1Hall ok\x9b\x7f"
SHOWN = r"\x1b]0;pwned\x07\x1b[2J\x1b[1;1Hall ok\x9b\x7f"
STEP = 30.0
runner = CliRunner()


def cli(*args: str, env: dict[str, str] | None = None, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """`python app/cli.py ARGS` on pipes, its output kept as the bytes a terminal would get."""
    return subprocess.run(
        [sys.executable, "app/cli.py", *args],
        cwd=ROOT, input=stdin, capture_output=True, timeout=STEP, env={**os.environ, **(env or {})},
    )  # fmt: skip


def cli_on_a_terminal(*args: str, env: dict[str, str] | None = None) -> bytes:
    """`python app/cli.py ARGS` with a pseudo-terminal as stdout and stderr: what the user's terminal receives."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "app/cli.py", *args],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env={**os.environ, **(env or {})},
    )  # fmt: skip
    os.close(terminal)
    received = b""
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], STEP)
            assert ready, f"the CLI printed nothing for {STEP} s"
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the CLI exited and closed the terminal
                break
            if not chunk:
                break
            received += chunk
        assert process.wait(timeout=STEP) == 0, received
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait()
    return received.replace(b"\r\n", b"\n")  # the terminal's own line discipline (onlcr)


def assert_no_controls(raw: bytes) -> None:
    """No C0 control but newline and tab, no DEL, no C1 control, in what reached the terminal."""
    text = raw.decode()
    found = sorted({f"U+{ord(c):04X}" for c in text if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) < 0xA0})
    assert not found, f"raw control characters reached the terminal: {found}"


@pytest.fixture
def served(log_path: Path) -> Iterator[RunningServer]:
    """MiniVault over the fake Ollama, which answers a prompt by echoing it: the answer carries the escapes too."""
    with serve_in_thread(FakeOllama(), lifespan="off") as upstream:
        with serve_in_thread(create_app(make_settings(ollama_base_url=upstream.url, log_path=log_path))) as server:
            yield server


def logged_evil_prompt(server: RunningServer, log_path: Path) -> str:
    response = httpx.post(f"{server.url}/generate", json={"prompt": EVIL}, timeout=STEP)
    assert (response.status_code, response.json()["response"]) == (200, EVIL)
    assert server.server.config.app.state.interaction_log.flush(timeout=STEP)
    [line] = read_log(log_path)
    assert (line["prompt"], line["response"]) == (EVIL, EVIL)
    return response.json()["id"]


def test_logs_show_a_prompts_escapes_instead_of_obeying_them(served: RunningServer, log_path: Path) -> None:
    logged_evil_prompt(served, log_path)
    served.stop()
    env = {"MINIVAULT_LOG_PATH": str(log_path), "MINIVAULT_URL": closed_port_url()}

    piped = cli("logs", env=env)
    terminal = cli_on_a_terminal("logs", env=env)
    searched = cli("logs", "search", "pwned", env=env)

    assert piped.returncode == 0, piped.stderr
    for output in (piped.stdout, terminal, searched.stdout):
        assert_no_controls(output)
        lines = output.decode().splitlines()
        assert f"  > {SHOWN}" in lines and f"  < {SHOWN}" in lines, lines


def test_logs_json_keeps_the_exact_text_with_every_control_escaped(served: RunningServer, log_path: Path) -> None:
    logged_evil_prompt(served, log_path)
    served.stop()

    result = cli("logs", "--json", "--path", str(log_path))

    assert_no_controls(result.stdout)
    [record] = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert (record["prompt"], record["response"]) == (EVIL, EVIL)
    assert r"\u001b]0;pwned\u0007" in result.stdout.decode() and r"\u009b\u007f" in result.stdout.decode()


def test_logs_follow_and_the_api_search_show_escapes(served: RunningServer, log_path: Path) -> None:
    logged_evil_prompt(served, log_path)
    found = cli("logs", "search", "pwned", "--url", served.url)
    process = subprocess.Popen(
        [sys.executable, "app/cli.py", "logs", "--follow", "-n", "1", "--path", str(log_path)],
        cwd=ROOT, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        followed = b"".join(process.stdout.readline() for _ in range(3))  # the record's three lines
    finally:
        process.terminate()
        process.wait(timeout=STEP)
        process.stdout.close()

    assert found.returncode == 0, found.stderr
    assert b"searching the history of MiniVault" in found.stderr
    for output in (found.stdout, followed):
        assert_no_controls(output)
        assert f"  > {SHOWN}" in output.decode().splitlines()


def test_a_live_answer_an_error_and_a_conversation_title_show_escapes(served: RunningServer) -> None:
    env = {"MINIVAULT_URL": served.url}
    conversation = httpx.post(f"{served.url}/conversations", json={}, timeout=STEP).json()["id"]
    turn = httpx.post(f"{served.url}/generate", json={"prompt": EVIL, "conversation_id": conversation}, timeout=STEP)
    assert turn.status_code == 200

    answer = cli(EVIL, env=env)  # on a pipe: one whole answer
    streamed = cli_on_a_terminal(EVIL, env=env)  # on a terminal: streamed token by token
    exact = cli(EVIL, "--json", env=env)
    error = cli("-m", f"absent{EVIL}", "hi", env=env)
    resumed = cli("chat", "--conversation", conversation, env=env)  # stdin at its end: prints the title, leaves

    assert (answer.returncode, answer.stdout.decode()) == (0, f"{SHOWN}\n")
    assert streamed.decode() == f"{SHOWN}\n"
    assert json.loads(exact.stdout)["response"] == EVIL
    assert error.returncode == 1
    assert f"model 'absent{SHOWN}'" in error.stderr.decode()
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.decode().startswith(f"resuming {SHOWN}: 1 turns so far\n")
    for output in (answer.stdout, streamed, exact.stdout, error.stderr, resumed.stdout):
        assert_no_controls(output)


# --- logs search --endpoint -------------------------------------------------------------------------------------


def test_logs_search_takes_every_endpoint_the_api_logs(tmp_path: Path) -> None:
    endpoints = get_args(Endpoint)
    path = tmp_path / "log.jsonl"
    records = [
        {"id": f"r{i}", "ts": "2026-01-01T00:00:00Z", "endpoint": endpoint, "backend": "ollama", "model": "m",
         "prompt": f"needle via {endpoint}", "response": "ok", "status": "ok"}
        for i, endpoint in enumerate(endpoints)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    env = {"MINIVAULT_LOG_PATH": str(path), "MINIVAULT_URL": closed_port_url()}

    found = [runner.invoke(app, ["logs", "search", "needle", "--json", "--endpoint", e], env=env) for e in endpoints]
    wrong = runner.invoke(app, ["logs", "search", "needle", "--endpoint", "carrier-pigeon"], env=env)

    assert {"openai", "ollama"} <= set(endpoints)  # `rest`, `sse` and `ws` were the only ones accepted
    assert [[json.loads(line)["id"] for line in result.stdout.splitlines()] for result in found] == [
        [f"r{i}"] for i in range(len(endpoints))
    ]
    assert wrong.exit_code == 2
    assert f"'carrier-pigeon' is not one of: {', '.join(endpoints)}" in wrong.stderr


def test_logs_search_sends_every_endpoint_to_the_api(served: RunningServer) -> None:
    # The API validates the same list: each value is a 200 there (no match here), none a 422.
    args = ["logs", "search", "nothing", "--url", served.url, "--endpoint"]
    results = [runner.invoke(app, [*args, endpoint]) for endpoint in get_args(Endpoint)]

    assert [(r.exit_code, r.stderr.splitlines()[-1]) for r in results] == [
        (1, "minivault: no exchange mentions 'nothing'")
    ] * len(results)
