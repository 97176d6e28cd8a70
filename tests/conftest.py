import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from app.config import Settings
from app.main import create_app
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

# Real PostgreSQL and Redis servers, and the dialect tests' gateways, started once per run by the tests
# that ask for them.
pytest_plugins = ["tests.support.postgres", "tests.support.redis_server", "tests.support.dialect_servers"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake() -> FakeOllama:
    return FakeOllama()


@pytest.fixture
def fake_server(fake: FakeOllama) -> Iterator[RunningServer]:
    with serve_in_thread(fake, lifespan="off") as server:
        yield server


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "log.jsonl"


def make_settings(**overrides: Any) -> Settings:
    """Settings that ignore the developer's `.env` and environment-specific defaults."""
    defaults: dict[str, Any] = {"backend": "ollama", "health_cache_seconds": 0, "read_timeout": 10.0}
    return Settings(_env_file=None, **{**defaults, **overrides})  # type: ignore[call-arg]


@pytest.fixture
def settings(fake_server: RunningServer, log_path: Path) -> Settings:
    return make_settings(ollama_base_url=fake_server.url, log_path=log_path)


@pytest.fixture
def minivault(settings: Settings) -> Iterator[RunningServer]:
    with serve_in_thread(create_app(settings)) as server:
        yield server


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every line of the interaction log, parsed; fails on a line that is not one JSON object."""
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def closed_port_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
