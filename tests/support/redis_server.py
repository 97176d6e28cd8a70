"""A real Redis for the tests: Debian's redis-server on a free loopback port, one per test run.

Use the fixtures `redis_server` and `redis_url` by importing them (`from tests.support.redis_server import
redis_server_fixture, redis_url_fixture  # noqa: F401`: named apart, so test parameters do not redefine them);
modules that import them share the one server (it is counted, and stopped when the last session fixture ends).
`redis_url` empties it before each test.
"""

import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from tests.support.servers import free_port

START_TIMEOUT = 15.0


@dataclass
class RedisServer:
    port: int
    process: "subprocess.Popen[bytes]"
    output: "tempfile._TemporaryFileWrapper[bytes]"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A synchronous client, for a test to look at the keys itself."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=START_TIMEOUT)


def _start() -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is missing: `make system-deps` installs Debian's redis-server")
    port = free_port()
    # Its log goes to a file, not a pipe nobody reads (a full pipe would stall it).
    output = tempfile.NamedTemporaryFile(prefix="redis-", suffix=".log")
    # No snapshots, no append-only file: nothing is written to disk.
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    server = RedisServer(port, process, output)
    deadline = time.monotonic() + START_TIMEOUT
    with server.client() as client:
        while True:
            try:
                client.ping()
                return server
            except redis.ConnectionError:
                if process.poll() is not None:  # e.g. the port was taken meanwhile
                    log = output.read().decode(errors="replace")
                    output.close()
                    raise RuntimeError(f"redis-server exited with {process.returncode}: {log[-2000:]}") from None
                if time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    output.close()
                    raise
                time.sleep(0.02)


def _stop(server: RedisServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
    server.output.close()


_shared: RedisServer | None = None
_users = 0
_shared_lock = threading.Lock()


@pytest.fixture(scope="session", name="redis_server")
def redis_server_fixture() -> Iterator[RedisServer]:
    """The run's one redis-server (started at first use, stopped after the last test that uses it)."""
    global _shared, _users
    with _shared_lock:
        if _shared is None:
            for attempt in range(3):  # a free port can be taken before redis-server binds it
                try:
                    _shared = _start()
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
        _users += 1
        server = _shared
    assert server is not None
    yield server
    with _shared_lock:
        _users -= 1
        if _users == 0:
            _shared = None
            _stop(server)


@pytest.fixture(name="redis_url")
def redis_url_fixture(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url
