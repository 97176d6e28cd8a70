"""Run an ASGI app under a real uvicorn server on a free loopback port, in a background thread,
or the fake Ollama in a subprocess of its own (`FakeOllamaProcess`) for crash-and-restart tests."""

import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import uvicorn
from starlette.types import ASGIApp


@dataclass
class RunningServer:
    host: str
    port: int
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        """Shut down gracefully (lifespan end included) and wait for it; safe to call twice."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            raise RuntimeError("the test server did not stop within 30 s")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"


def bound_socket() -> socket.socket:
    """A listening socket on a free loopback port: clients may connect before the server loop runs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


@contextmanager
def serve_in_thread(app: ASGIApp, *, lifespan: str = "on", ws_ping: float | None = 20.0) -> Iterator[RunningServer]:
    """Serve `app` until the block ends, then shut it down gracefully and join the thread."""
    sock = bound_socket()
    config = uvicorn.Config(
        app, log_level="warning", lifespan=lifespan, ws_ping_interval=ws_ping, timeout_graceful_shutdown=10
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    running = RunningServer("127.0.0.1", sock.getsockname()[1], server, thread)
    try:
        yield running
    finally:
        running.stop()
        sock.close()


REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on right now (the kernel picks it; a race is possible but unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeOllamaProcess:
    """The fake Ollama in its own process, so a test can SIGKILL it like a crashed Ollama and bring it back.

    The port is fixed at construction, so `restart()` comes back on the same URL the gateway was configured with.
    """

    START_TIMEOUT = 15.0
    STOP_GRACE = 5.0

    def __init__(self, delay: float | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.delay = delay
        self.process: subprocess.Popen[bytes] | None = None
        # A file, not a pipe: nobody reads the output while the fake runs, and a full pipe would block it.
        self._output: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Launch the fake and return once `GET /api/version` answers 200; fail if it exits or is slow."""
        if self.running:
            raise RuntimeError(f"the fake Ollama is already running on {self.url}")
        self._reap()
        command = [sys.executable, "-m", "tests.support.fake_ollama", "--port", str(self.port)]
        if self.delay is not None:
            command += ["--delay", str(self.delay)]
        self._output = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self._output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.START_TIMEOUT
        with httpx.Client(timeout=1.0) as client:
            while True:
                if self.process.poll() is not None:
                    output = self._read_output()
                    self._reap()
                    raise RuntimeError(f"the fake Ollama exited before answering on {self.url}:\n{output}")
                try:
                    if client.get(f"{self.url}/api/version").status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    output = self._read_output()
                    self.stop()
                    raise RuntimeError(
                        f"the fake Ollama did not answer on {self.url} within {self.START_TIMEOUT} s:\n{output}"
                    )
                time.sleep(0.05)  # polling interval while the child imports and binds

    def kill(self) -> None:
        """SIGKILL, as when Ollama crashes or is OOM-killed: no graceful shutdown, connections just drop."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=self.STOP_GRACE)
        self._reap()

    def restart(self) -> None:
        """Start again on the same port (killing it first if it still runs); uvicorn binds with SO_REUSEADDR."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `STOP_GRACE` seconds; safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=self.STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=self.STOP_GRACE)
        self._reap()

    def _read_output(self) -> str:
        if self._output is None:
            return ""
        self._output.seek(0)
        return self._output.read().decode(errors="replace")[-4000:]

    def _reap(self) -> None:
        """Forget an exited process and close its output file (otherwise pytest turns ResourceWarnings into errors)."""
        if self.process is not None and self.process.poll() is not None:
            self.process = None
        if self.process is None and self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> "FakeOllamaProcess":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def poll_ready(server: RunningServer, done: Callable[[httpx.Response], bool], within: float = 15.0
               ) -> httpx.Response:  # fmt: skip
    """GET /ready until `done(response)` holds (it changes on the server's own schedule); fail after `within` s."""
    deadline = time.monotonic() + within
    while not done(response := httpx.get(f"{server.url}/ready")):
        assert time.monotonic() < deadline, f"/ready stayed {response.status_code} {response.text}"
        time.sleep(0.02)
    return response
