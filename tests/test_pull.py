"""POST /models/pull: Ollama's pull progress relayed as Server-Sent Events."""

from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from app.main import create_app
from tests.conftest import make_settings
from tests.support.servers import RunningServer, serve_in_thread


def pull_events(url: str, body: object) -> tuple[httpx.Response, list[tuple[str, dict]]]:
    with httpx.Client(base_url=url) as client, connect_sse(client, "POST", "/models/pull", json=body) as source:
        if not source.response.is_success:
            source.response.read()
            return source.response, []
        return source.response, [(event.event, event.json()) for event in source.iter_sse()]


def test_pull_streams_progress_then_done(minivault: RunningServer) -> None:
    response, events = pull_events(minivault.url, {"model": "phi3:mini"})

    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[0] == ("progress", {"status": "pulling manifest"})
    layer = [data for name, data in events if data.get("digest") == "sha256:2af3b81862c6"]
    assert [data["completed"] for data in layer] == [0, 159_250_000, 318_500_000, 637_000_000]
    assert events[-1] == ("done", {"status": "success"})
    models = httpx.get(f"{minivault.url}/models").json()["models"]
    assert "phi3:mini" in [model["name"] for model in models]


def test_unknown_model_ends_with_an_error_event(minivault: RunningServer) -> None:
    _, events = pull_events(minivault.url, {"model": "no-such-thing"})

    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body", [{}, {"model": ""}, {"model": "x", "force": True}])
def test_bad_body_is_422(minivault: RunningServer, body: dict) -> None:
    response, _ = pull_events(minivault.url, body)

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_backends_without_pull_answer_501(log_path: Path) -> None:
    settings = make_settings(backend="embedded", embedded_context=512, log_path=log_path)
    with serve_in_thread(create_app(settings)) as server:
        response, _ = pull_events(server.url, {"model": "tinyllama"})

    assert response.status_code == 501
    assert response.json()["error"] == {
        "code": "not_supported",
        "message": "the embedded backend cannot pull models; pulling works with Ollama (MINIVAULT_BACKEND=ollama)",
        "id": response.headers["x-request-id"],
    }
