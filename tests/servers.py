"""Run an ASGI app under a real uvicorn server on a free loopback port, in a background thread."""

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
