"""The CLI, driven through typer's CliRunner and as a real subprocess, against a live MiniVault."""

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.main import create_app
from tests.conftest import closed_port_url, make_settings
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def run_cli(*args: str, url: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`python app/cli.py ARGS`, exactly as the README types it."""
    return subprocess.run(
        [sys.executable, "app/cli.py", *args],
        cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60,
        env={**os.environ, "MINIVAULT_URL": url, **env},
    )  # fmt: skip


def test_seed_one_liner_prints_the_answer(minivault: RunningServer) -> None:
    result = run_cli("Explain photosynthesis", url=minivault.url)

    assert (result.returncode, result.stdout, result.stderr) == (0, "Explain photosynthesis\n", "")


def test_console_script_is_installed_and_works(minivault: RunningServer) -> None:
    script = Path(sys.executable).parent / "minivault"
    assert script.exists(), "`pip install -e .` (make test does it) installs the minivault console script"
    result = subprocess.run([str(script), "Explain gravity"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "MINIVAULT_URL": minivault.url})  # fmt: skip

    assert (result.returncode, result.stdout) == (0, "Explain gravity\n")


def test_json_prints_the_done_object(minivault: RunningServer) -> None:
    result = runner.invoke(cli, ["generate", "--json", "--url", minivault.url, "one two"])

    assert result.exit_code == 0
    done = json.loads(result.stdout)
    assert done["response"] == "one two"
    assert done["usage"] == {"prompt_tokens": 2, "completion_tokens": 2}


def test_prompt_from_stdin_and_typed_options(minivault: RunningServer, fake: FakeOllama) -> None:
    result = run_cli("-", "-m", "llama3", "-s", "Be brief.", "-o", "temperature=0.2", "-o", "num_predict=2",
                     "-o", "stop=###", url=minivault.url, stdin="alpha beta gamma\n")  # fmt: skip

    assert (result.returncode, result.stdout) == (0, "alpha beta \n")
    assert fake.requests[-1] == {
        "model": "llama3", "prompt": "alpha beta gamma\n", "stream": True, "system": "Be brief.",
        "options": {"temperature": 0.2, "num_predict": 2, "stop": ["###"]},
    }  # fmt: skip


def test_a_prompt_named_like_a_command_needs_generate(minivault: RunningServer) -> None:
    as_prompt = runner.invoke(cli, ["generate", "--url", minivault.url, "models"])
    as_command = runner.invoke(cli, ["models", "--url", minivault.url])

    assert as_prompt.stdout == "models\n"
    assert re.search(r"^\* tinyllama:1\.1b-chat +1\.0 KB$", as_command.stdout, re.MULTILINE)


def test_stream_prints_tokens_before_the_answer_is_complete(minivault: RunningServer, fake: FakeOllama) -> None:
    process = subprocess.Popen(
        [sys.executable, "app/cli.py", "--stream", "-m", "slow", "-o", "num_predict=40", "go"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "MINIVAULT_URL": minivault.url},
    )  # fmt: skip
    assert process.stdout is not None
    first = process.stdout.read(3)
    # The fake needs 40 x 20 ms; the first token is on screen while it is still generating.
    assert first == "w0 "
    assert fake.finished == 0
    rest = process.stdout.read()
    process.stdout.close()
    assert process.wait(timeout=30) == 0
    assert (first + rest).split() == [f"w{i}" for i in range(40)]


def test_streams_by_default_on_a_terminal(minivault: RunningServer, fake: FakeOllama) -> None:
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "app/cli.py", "-m", "slow", "-o", "num_predict=40", "go"],
        cwd=ROOT, stdout=terminal, stderr=terminal, env={**os.environ, "MINIVAULT_URL": minivault.url},
    )  # fmt: skip
    os.close(terminal)
    try:
        ready, _, _ = select.select([controller], [], [], 30)
        assert ready, "nothing reached the terminal"
        first = os.read(controller, 1024).decode()
        assert first.startswith("w0")
        assert fake.finished == 0
        assert process.wait(timeout=30) == 0
    finally:
        os.close(controller)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-m", "absent", "hi"], 1, "minivault: model_not_found: model 'absent' is not installed in Ollama"),
        (["generate", "-o", "nonsense", "hi"], 2, "'nonsense' is not key=value"),
        (["generate", "--bogus", "hi"], 2, "No such option: --bogus"),
        (["generate", "   "], 1, "minivault: invalid_request: prompt: must not be blank"),
    ],
)
def test_errors_are_one_line_with_the_documented_exit_code(
    minivault: RunningServer, args: list[str], code: int, message: str
) -> None:
    result = run_cli(*args, url=minivault.url)

    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if code == 1:
        assert result.stderr.count("\n") == 1
        assert result.stdout == ""


def test_unreachable_minivault_exits_3_saying_how_to_start_it() -> None:
    url = closed_port_url()
    result = run_cli("hi", url=url)

    assert result.returncode == 3
    assert result.stderr == (
        f"minivault: cannot reach MiniVault at {url}: start it with `make run` (or `python app/cli.py serve`), "
        "or point --url / MINIVAULT_URL at it\n"
    )


def test_api_key_comes_from_the_option_or_the_environment(fake_server: RunningServer, log_path: Path) -> None:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, api_keys="cli-key")
    with serve_in_thread(create_app(settings)) as server:
        without = runner.invoke(cli, ["--no-stream", "--url", server.url, "hello there"])
        by_option = runner.invoke(cli, ["--no-stream", "--url", server.url, "--api-key", "cli-key", "hello there"])
        by_env = runner.invoke(cli, ["models", "--url", server.url], env={"MINIVAULT_API_KEY": "cli-key"})
        stream = runner.invoke(cli, ["--stream", "--url", server.url, "hi"], env={"MINIVAULT_API_KEY": "cli-key"})

    assert without.exit_code == 1
    assert without.stderr.startswith("minivault: unauthorized: an API key is required")
    assert "--api-key or MINIVAULT_API_KEY" in without.stderr
    assert (by_option.exit_code, by_option.stdout) == (0, "hello there\n")
    assert by_env.exit_code == 0 and "tinyllama:1.1b-chat" in by_env.stdout
    assert (stream.exit_code, stream.stdout) == (0, "hi\n")


def test_health_and_models(minivault: RunningServer) -> None:
    health = runner.invoke(cli, ["health", "--url", minivault.url])
    health_json = runner.invoke(cli, ["health", "--json", "--url", minivault.url])
    models_json = runner.invoke(cli, ["models", "--json", "--url", minivault.url])

    assert health.exit_code == 0
    assert "model tinyllama:1.1b-chat: available" in health.stdout
    assert json.loads(health_json.stdout)["backend"]["reachable"] is True
    assert json.loads(models_json.stdout)["default"] == "tinyllama:1.1b-chat"


def test_pull_shows_progress_per_layer(minivault: RunningServer, fake: FakeOllama) -> None:
    result = run_cli("pull", "qwen2:0.5b", url=minivault.url)

    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "pulling manifest"
    assert any("2af3b81862c6" in line and "637.0/637.0 MB" in line and "100%" in line for line in lines)
    assert any("af0ddbdaaa26" in line and "1.2/1.2 kB" in line and "100%" in line for line in lines)
    assert lines[-1] == "pulled qwen2:0.5b"
    assert "qwen2:0.5b" in fake.models


def test_pull_of_an_unknown_model_fails_with_exit_1(minivault: RunningServer) -> None:
    result = run_cli("pull", "no-such-model", url=minivault.url)

    assert result.returncode == 1
    assert result.stderr.endswith(
        "minivault: model_not_found: Ollama's registry has no model 'no-such-model' "
        "(pull model manifest: file does not exist)\n"
    )


def test_logs_tail_search_and_json(minivault: RunningServer, log_path: Path) -> None:
    for prompt in ("first apple", "second banana", "third cherry"):
        assert httpx.post(f"{minivault.url}/generate", json={"prompt": prompt}).status_code == 200
    minivault.stop()
    # Search asks the API first; nothing listens at this URL, so it reads the file.
    env = {"MINIVAULT_LOG_PATH": str(log_path), "MINIVAULT_URL": closed_port_url()}

    tail = runner.invoke(cli, ["logs", "-n", "2"], env=env)
    found = runner.invoke(cli, ["logs", "search", "BANANA", "--json"], env=env)
    missing = runner.invoke(cli, ["logs", "search", "durian"], env=env)

    assert tail.exit_code == 0
    assert [line for line in tail.stdout.splitlines() if line.startswith("  > ")] == [
        "  > second banana",
        "  > third cherry",
    ]
    [record] = [json.loads(line) for line in found.stdout.splitlines()]
    assert record["prompt"] == "second banana"
    assert missing.exit_code == 1
    assert "no exchange mentions 'durian'" in missing.stderr


def test_logs_follow_prints_new_exchanges(minivault: RunningServer, log_path: Path) -> None:
    before = httpx.post(f"{minivault.url}/generate", json={"prompt": "already there"}).json()
    assert minivault_log_flushed(minivault)
    process = subprocess.Popen(
        [sys.executable, "app/cli.py", "logs", "--follow", "--json", "-n", "1", "--path", str(log_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        # The last existing line is printed first; from then on the follower is watching.
        assert json.loads(process.stdout.readline())["id"] == before["id"]
        after = httpx.post(f"{minivault.url}/generate", json={"prompt": "followed prompt"}).json()
        record = json.loads(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
    assert record["id"] == after["id"]
    assert record["prompt"] == "followed prompt"


def minivault_log_flushed(server: RunningServer) -> bool:
    return server.server.config.app.state.interaction_log.flush(timeout=10)


def test_logs_without_a_log_file_says_where_it_looked(tmp_path: Path) -> None:
    result = runner.invoke(cli, ["logs", "--path", str(tmp_path / "none.jsonl")])

    assert result.exit_code == 1
    assert f"no interaction log at {tmp_path / 'none.jsonl'} yet" in result.stderr


def test_serve_starts_the_api(fake_server: RunningServer, tmp_path: Path) -> None:
    port = int(closed_port_url().rsplit(":", 1)[1])
    env = {**os.environ, "MINIVAULT_BACKEND": "ollama", "OLLAMA_BASE_URL": fake_server.url,
           "MINIVAULT_LOG_PATH": str(tmp_path / "log.jsonl")}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "app/cli.py", "serve", "--port", str(port)],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail("serve exited before listening")
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        answer = run_cli("served prompt", url=f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stderr.close()  # type: ignore[union-attr]
    assert (health["backend"]["name"], health["backend"]["reachable"]) == ("ollama", True)
    assert answer.stdout == "served prompt\n"
