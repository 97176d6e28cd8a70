"""Processes under test: start them on loopback, wait until they serve, read their CPU and memory."""

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Block until something accepts connections on the port; fail if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on port {port} within {timeout} s")


@dataclass
class Served:
    """A server process and its port; `pids` includes uvicorn's worker processes."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.process.pid:
                    children.append(int(entry.name))
        return [self.process.pid, *children]

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and its workers so far."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / CLOCK_TICKS

    def memory_kib(self, field_name: str) -> int:
        """VmRSS (now) or VmHWM (peak) of the server process, summed over workers."""
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field_name + ":"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_fake(workdir: Path, *, name: str = "fake", slowdown: float = 1.0, parallel: int = 0) -> Served:
    """The fast fake; `slowdown` multiplies the token interval the prompt asks for (a slower host), and
    `parallel` bounds the paced answers it generates at once (0: no bound)."""
    port = free_port()
    log = workdir / f"{name}.log"
    environment = {**os.environ, "FAKE_OLLAMA_SLOWDOWN": str(slowdown), "FAKE_OLLAMA_PARALLEL": str(parallel)}
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fake_ollama", "--fast", "--port", str(port)],
            cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_for_port(port, process)
    return Served(process, port, log)


def production_flags(code: Path = ROOT) -> list[str]:
    """The uvicorn options of the Dockerfile's CMD in `code`, less host and port: the benchmark runs what ships."""
    for line in (code / "Dockerfile").read_text().splitlines():
        if line.startswith("CMD "):
            command = json.loads(line[4:])
            flags = command[command.index("app.main:app") + 1 :]
            for option in ("--host", "--port"):
                if option in flags:
                    index = flags.index(option)
                    del flags[index : index + 2]
            return flags
    raise RuntimeError("the Dockerfile has no CMD line")


# The shipped defaults admit 4 generations at once (one Ollama's worth); the benchmark's fake takes
# hundreds, and its websocket and throughput figures measure MiniVault, not the queue.
WIDE_LIMITS = {"MINIVAULT_MAX_CONCURRENCY": "1024", "MINIVAULT_MAX_QUEUE": "1024"}


def start_minivault(
    workdir: Path,
    upstream: str,
    *,
    workers: int = 1,
    name: str = "minivault",
    env: dict[str, str] | None = None,
    code: Path = ROOT,
    target: str = "app.main:app",
    http: str | None = None,
) -> Served:
    """MiniVault as the Dockerfile's CMD (of `code`, which may be another version's tree) runs it, bound to
    loopback; `target` may be another ASGI app (bench/history_off.py), `http` another uvicorn protocol."""
    port = free_port()
    log = workdir / f"{name}.out"
    interactions = workdir / f"{name}.jsonl"
    interactions.unlink(missing_ok=True)
    environment = {**os.environ, "MINIVAULT_BACKEND": "ollama", "OLLAMA_BASE_URL": upstream,
                   "OLLAMA_MODEL": "bench:latest", "MINIVAULT_LOG_PATH": str(interactions),
                   "MINIVAULT_DB_PATH": str(workdir / f"{name}.db"),
                   **WIDE_LIMITS, **(env or {})}  # fmt: skip
    flags = production_flags(code)
    if http is not None:  # in place of the CMD's own choice (the guarded protocol, in this version)
        if "--http" in flags:
            del flags[flags.index("--http") : flags.index("--http") + 2]
        flags += ["--http", http]
    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port), *flags]
    if workers > 1:
        command += ["--workers", str(workers)]
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=code, env=environment, stdout=output, stderr=subprocess.STDOUT)
    wait_for_port(port, process)
    served = Served(process, port, log, {"interactions": str(interactions), "db": str(workdir / f"{name}.db")})
    if workers > 1:
        # Each worker opens its own socket listener; wait until all have finished their lifespan start-up.
        deadline = time.monotonic() + 60
        while log.read_text().count("Application startup complete") < workers and time.monotonic() < deadline:
            time.sleep(0.05)
    return served
