"""MINIVAULT_BACKEND: `auto` picks Ollama when it answers, else the embedded engine; explicit never falls back."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import app.backends
from app.main import create_app
from tests.conftest import closed_port_url, make_settings, read_log
from tests.support.servers import RunningServer, serve_in_thread

ROOT = Path(__file__).resolve().parent.parent


def backend_of(server: RunningServer) -> dict:
    return httpx.get(f"{server.url}/health").json()["backend"]


def test_auto_picks_ollama_when_it_answers(fake_server: RunningServer, log_path: Path) -> None:
    settings = make_settings(backend="auto", ollama_base_url=fake_server.url, log_path=log_path)
    with serve_in_thread(create_app(settings)) as server:
        assert backend_of(server)["name"] == "ollama"


def test_auto_falls_back_to_the_embedded_engine(log_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = closed_port_url()
    settings = make_settings(backend="auto", ollama_base_url=url, log_path=log_path)
    with caplog.at_level(logging.INFO), serve_in_thread(create_app(settings)) as server:
        backend = backend_of(server)
        response = httpx.post(f"{server.url}/generate", json={"prompt": "Hi!", "options": {"num_predict": 8}})

    assert backend["name"] == "embedded"
    assert backend["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert response.status_code == 200
    assert response.json()["response"].strip()
    assert f"Ollama not reachable at {url}; serving with the embedded SmolLM2-135M-Instruct.Q4_1 model" in caplog.text
    assert read_log(log_path)[0]["backend"] == "embedded"


def test_auto_without_the_engine_starts_on_ollama(
    log_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(app.backends, "engine_installed", lambda: False)
    settings = make_settings(backend="auto", ollama_base_url=closed_port_url(), log_path=log_path)
    with serve_in_thread(create_app(settings)) as server:
        assert backend_of(server)["name"] == "ollama"
        assert httpx.get(f"{server.url}/ready").status_code == 503
    assert "the embedded engine is not installed" in caplog.text


def test_explicit_ollama_never_falls_back(log_path: Path) -> None:
    settings = make_settings(backend="ollama", ollama_base_url=closed_port_url(), log_path=log_path)
    with serve_in_thread(create_app(settings)) as server:
        assert backend_of(server)["name"] == "ollama"
        response = httpx.post(f"{server.url}/generate", json={"prompt": "hi"})
    assert response.json()["error"]["code"] == "backend_unavailable"


def test_embedded_with_a_missing_model_file_stops_start_up(tmp_path: Path) -> None:
    env = {**os.environ, "MINIVAULT_BACKEND": "embedded", "MINIVAULT_EMBEDDED_MODEL_PATH": str(tmp_path / "x.gguf")}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert result.returncode != 0
    assert f"no GGUF model at {tmp_path / 'x.gguf'} (MINIVAULT_EMBEDDED_MODEL_PATH)" in result.stderr


def test_readme_run_command_serves_the_embedded_model(tmp_path: Path) -> None:
    """`make run` the way a newcomer types it, with no Ollama anywhere."""
    port = int(closed_port_url().rsplit(":", 1)[1])
    env = {
        **os.environ,
        "OLLAMA_BASE_URL": closed_port_url(),
        "MINIVAULT_LOG_PATH": str(tmp_path / "log.jsonl"),
        "PORT": str(port),
    }
    process = subprocess.Popen(
        ["make", "run"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:
            seen.append(line)
            if "Uvicorn running on" in line:
                break
        else:
            pytest.fail("make run exited before serving:\n" + "".join(seen))
        assert "serving with the embedded SmolLM2-135M-Instruct.Q4_1 model" in "".join(seen)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/ready").status_code == 200
        # httpx's default 5 s is too tight for 24 tokens on a busy 2-core machine.
        response = httpx.post(
            f"{url}/generate",
            json={"prompt": "Explain gravity in one sentence.", "options": {"num_predict": 24}},
            timeout=60,
        )
        assert response.status_code == 200
        assert response.json()["response"].strip()
        assert response.json()["model"] == "SmolLM2-135M-Instruct.Q4_1"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        process.stderr.close()  # type: ignore[union-attr]
    assert read_log(tmp_path / "log.jsonl")[0]["backend"] == "embedded"
