"""GET /health, /ready and /models against the fake Ollama, a stopped one, and a failing log."""

from pathlib import Path

import httpx

from app import __version__
from app.main import create_app
from tests.conftest import closed_port_url, make_settings
from tests.support.servers import RunningServer, serve_in_thread


def test_health_reports_backend_and_log(minivault: RunningServer, fake_server: RunningServer) -> None:
    response = httpx.get(f"{minivault.url}/health")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "version": __version__,
        "backend": {
            "name": "ollama",
            "model": "tinyllama:1.1b-chat",
            "reachable": True,
            "model_available": True,
        },
        "log": "ok",
    }
    assert response.headers["x-request-id"]


def test_ready_is_200_when_ollama_has_the_model(minivault: RunningServer) -> None:
    response = httpx.get(f"{minivault.url}/ready")

    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_stopped_ollama_is_alive_but_not_ready(log_path: Path) -> None:
    url = closed_port_url()
    with serve_in_thread(create_app(make_settings(ollama_base_url=url, log_path=log_path))) as server:
        health = httpx.get(f"{server.url}/health")
        ready = httpx.get(f"{server.url}/ready")
        models = httpx.get(f"{server.url}/models")

    assert health.status_code == 200
    assert health.json()["backend"]["reachable"] is False
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable"
    # Open to anyone: the setting that locates the upstream, not its URL.
    assert ready.json()["reason"] == "Ollama is not answering at OLLAMA_BASE_URL (ConnectError)"
    assert url.removeprefix("http://") not in health.text + ready.text
    assert models.status_code == 503
    assert models.json()["error"]["code"] == "backend_unavailable"


def test_ready_is_503_when_the_model_is_not_pulled(fake_server: RunningServer, log_path: Path) -> None:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, ollama_model="qwen2:0.5b")
    with serve_in_thread(create_app(settings)) as server:
        ready = httpx.get(f"{server.url}/ready")

    assert ready.status_code == 503
    assert ready.json()["backend"]["reachable"] is True
    assert ready.json()["backend"]["model_available"] is False
    assert "ollama pull qwen2:0.5b" in ready.json()["reason"]


def test_models_lists_names_and_sizes(minivault: RunningServer) -> None:
    response = httpx.get(f"{minivault.url}/models")

    assert response.status_code == 200
    body = response.json()
    assert body["default"] == "tinyllama:1.1b-chat"
    assert body["models"][0] == {
        "name": "tinyllama:1.1b-chat",
        "size": 1000,
        "modified_at": "2026-01-01T00:00:00Z",
        "details": {"family": "fake"},
        "capabilities": ["completion", "tools"],
    }
    assert "llama3:latest" in [model["name"] for model in body["models"]]


def test_failing_log_shows_in_health_and_does_not_fail_requests(fake_server: RunningServer, caplog) -> None:
    # /dev/full accepts the open and fails every write with ENOSPC: a real disk-full error.
    settings = make_settings(ollama_base_url=fake_server.url, log_path=Path("/dev/full"))
    app = create_app(settings)
    with serve_in_thread(app) as server:
        generated = httpx.post(f"{server.url}/generate", json={"prompt": "still answered"})
        assert app.state.interaction_log.flush(timeout=10)
        health = httpx.get(f"{server.url}/health")

    assert generated.status_code == 200
    assert generated.json()["response"] == "still answered"
    assert health.status_code == 200
    assert health.json()["log"] == "failing"
    assert any("No space left on device" in record.getMessage() for record in caplog.records)
