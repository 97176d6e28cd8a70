"""MiniVault in front of the fake Ollama or the embedded engine, for the OpenAI- and Ollama-dialect tests,
with the official clients of both APIs pointed at it."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from fastapi import FastAPI

from app.main import create_app
from tests.conftest import make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

LOG_WAIT = 10.0


@dataclass
class Gateway:
    """A running MiniVault; `fake` is the upstream when the backend is Ollama (None on embedded)."""

    server: RunningServer
    app: FastAPI
    log_path: Path
    fake: FakeOllama | None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def backend(self) -> str:
        return self.app.state.backend.name

    @property
    def model(self) -> str:
        """The backend's default model, which both upstreams have."""
        return self.app.state.backend.default_model

    def backend_models(self) -> list[str]:
        """What the upstream itself holds: the fake's list, or the one model the engine serves."""
        return list(self.fake.models) if self.fake is not None else [self.model]

    def openai_client(self, api_key: str = "unused") -> openai.OpenAI:
        # No retries: a test asserts the first answer, and a retried 502 would only add back-off time.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30)

    def async_openai_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=30)

    def logged(self, request_id: str) -> dict[str, Any]:
        """The log line of one exchange, once the writer has flushed it."""
        deadline = time.monotonic() + LOG_WAIT
        while True:
            try:
                matches = [line for line in read_log(self.log_path) if line["id"] == request_id]
            except ValueError:  # caught halfway through writing a line
                matches = []
            assert len(matches) <= 1, matches
            if matches:
                return matches[0]
            assert time.monotonic() < deadline, f"no log line for {request_id} within {LOG_WAIT} s"
            time.sleep(0.01)  # the writer is another thread: nothing to wait on but the file


class RequestIds:
    """An httpx response hook for Ollama's client, whose answers do not carry MiniVault's request id."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, response: httpx.Response) -> None:
        self.seen.append(response.headers["x-request-id"])

    async def on_async(self, response: httpx.Response) -> None:
        self(response)

    @property
    def last(self) -> str:
        return self.seen[-1]


def ollama_client(gateway: Gateway, ids: RequestIds | None = None, **options: Any) -> ollama.Client:
    hooks = {"response": [ids]} if ids is not None else {}
    return ollama.Client(host=gateway.url, timeout=30, event_hooks=hooks, **options)


def async_ollama_client(gateway: Gateway, ids: RequestIds) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=gateway.url, timeout=30, event_hooks={"response": [ids.on_async]})


def wait_started(server: RunningServer, within: float = 30.0) -> RunningServer:
    """Return once the lifespan has run: the socket accepts before it, but `app.state.backend` is set by it."""
    deadline = time.monotonic() + within
    while not server.server.started:
        assert server.thread.is_alive(), "MiniVault exited during start-up"
        assert time.monotonic() < deadline, f"MiniVault did not start within {within} s"
        time.sleep(0.01)  # uvicorn sets the flag in its own thread
    return server


@contextmanager
def fake_gateway(log_path: Path, **overrides: Any) -> Iterator[Gateway]:
    """MiniVault over a fresh fake Ollama."""
    fake = FakeOllama()
    with serve_in_thread(fake, lifespan="off") as upstream:
        app = create_app(make_settings(ollama_base_url=upstream.url, log_path=log_path, **overrides))
        with serve_in_thread(app) as server:
            yield Gateway(wait_started(server), app, log_path, fake)


@contextmanager
def embedded_gateway(log_path: Path) -> Iterator[Gateway]:
    """MiniVault over the embedded engine and the bundled SmolLM2-135M (loads in about a second)."""
    # One thread: eight tokens of a 135M model take well under a second on it, and on a 2-core runner a second
    # llama.cpp thread only competes with the server and the test for the CPU (calls of seconds under load).
    settings = make_settings(backend="embedded", embedded_context=1024, embedded_threads=1, log_path=log_path)
    app = create_app(settings)
    with serve_in_thread(app) as server:
        yield Gateway(wait_started(server), app, log_path, None)


# Fixtures (tests/conftest.py loads this module as a plugin): one embedded engine and one fake for the
# whole run, shared by the OpenAI and Ollama API tests, which look only at their own answers and log lines.


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with embedded_gateway(tmp_path_factory.mktemp("embedded") / "log.jsonl") as gateway:
        yield gateway


@pytest.fixture(scope="session")
def shared_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with fake_gateway(tmp_path_factory.mktemp("fake") / "log.jsonl") as gateway:
        yield gateway
