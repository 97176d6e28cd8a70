"""The connection guards (app/web/connections.py) against the attacks of issue 15 §2, on a real uvicorn process.

Each test starts MiniVault as `uvicorn app.main:app --http app.web.connections:GuardedProtocol` (what `make run`
and the Dockerfile run) in front of the fake Ollama, and attacks it over loopback: huge request heads (RSS
read from /proc), heads and bodies sent slowly, more connections than the cap. The contrast tests run the
same attack on plain `--http httptools`, the protocol MiniVault was served with before, and see it succeed.
"""

import asyncio
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import orjson
import pytest

from tests.support.servers import REPO_ROOT, FakeOllamaProcess, bound_socket

GUARDED = "app.web.connections:GuardedProtocol"
MB = 1024 * 1024


def _raise_own_descriptor_limit() -> None:
    # The slow-client tests hold over a thousand sockets on this side too.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class MiniVault:
    """MiniVault in its own uvicorn process (its RSS is its own), on a socket bound here and passed by fd."""

    def __init__(self, upstream: str, tmp: Path, env: dict[str, str], *, http: str = GUARDED,
                 nofile: int | None = None) -> None:  # fmt: skip
        self.sock = bound_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("MINIVAULT_", "OLLAMA_", "PROMETHEUS_"))}
        clean.update({"MINIVAULT_BACKEND": "ollama", "OLLAMA_BASE_URL": upstream,
                      "MINIVAULT_LOG_PATH": str(tmp / "log.jsonl"), "MINIVAULT_DB_PATH": str(tmp / "history.db"),
                      **env})  # fmt: skip
        self.output: IO[bytes] = tempfile.TemporaryFile()

        def limit_descriptors() -> None:  # in the child: a machine whose limit is `nofile`, soft and hard
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--fd", str(self.sock.fileno()), "--http", http,
             "--no-access-log"],
            cwd=REPO_ROOT, env=clean, pass_fds=[self.sock.fileno()], stdout=self.output, stderr=subprocess.STDOUT,
            preexec_fn=limit_descriptors,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while "Application startup complete" not in self.log():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, f"MiniVault did not start:\n{self.log()}"
            time.sleep(0.05)

    def log(self) -> str:
        self.output.seek(0)
        return self.output.read().decode(errors="replace")

    def memory_mb(self, field: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no {field} in /proc status")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.sock.close()
        self.output.close()


def wait_for_log(server: MiniVault, text: str, within: float = 5.0) -> None:
    """The guards log a summary at their next sweep (every 0.5 s): wait for it."""
    deadline = time.monotonic() + within
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{server.log()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with FakeOllamaProcess() as fake:
        yield fake.url


@pytest.fixture
def start(upstream: str, tmp_path: Path) -> Iterator[object]:
    started: list[MiniVault] = []

    def _start(env: dict[str, str] | None = None, **options: object) -> MiniVault:
        workdir = tmp_path / str(len(started))
        workdir.mkdir()
        started.append(MiniVault(upstream, workdir, env or {}, **options))  # type: ignore[arg-type]
        return started[-1]

    yield _start
    for server in started:
        server.close()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {name.lower(): value for name, value in headers.items()}, body


async def read_until_closed(reader: asyncio.StreamReader, limit: int = 1 * MB) -> bytes:
    """What the server sends until it closes; a reset after the answer counts as the close."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
            assert len(data) < limit
    except ConnectionError:
        pass
    return data


# --- huge heads --------------------------------------------------------------------------------------------


async def huge_head(port: int, total: int) -> tuple[str, int]:
    """Send small headers until `total` bytes or until the server answers or closes; returns what happened."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    line = b"X-Padding-Header: " + b"a" * 40 + b"\r\n"
    headers = line * (MB // len(line))
    answer = asyncio.ensure_future(read_until_closed(reader))
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    sent = 0
    try:
        while sent < total and not answer.done():
            writer.write(headers)
            await writer.drain()
            sent += len(headers)
            # drain() returns without yielding while the kernel takes every write (a server that drops what it
            # reads keeps up), and then the answer would never be read: let the reader run once per megabyte.
            await asyncio.sleep(0)
    except ConnectionError:
        pass
    if sent >= total:  # the server took it all (the unguarded one does): end the head and wait no longer
        answer.cancel()
        writer.close()
        return "sent all", sent
    raw = await asyncio.wait_for(answer, 30)
    writer.close()
    if not raw:
        return "closed", sent
    status, headers, body = parse_response(raw)
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == "headers_too_large"
    assert orjson.loads(body)["error"]["id"] == headers["x-request-id"]
    return str(status), sent


def test_huge_heads_get_431_and_leave_memory_bounded(start) -> None:
    # The attack: 64 MB of small headers per connection, 8 at once (4 took the old server to 2.45 GB).
    server = start()
    assert "connection guards on: heads up to 65536 bytes" in server.log()
    httpx.get(f"{server.url}/health").raise_for_status()  # warm: the first request allocates what it keeps
    rss_before, peak_before = server.memory_mb(), server.memory_mb("VmHWM")

    async def attack() -> list[tuple[str, int]]:
        return await asyncio.gather(*(huge_head(server.port, 64 * MB) for _ in range(8)))

    outcomes = asyncio.run(attack())

    # Each read its 431 (the server drops what still arrives for a moment before closing, so no reset loses it).
    assert [outcome for outcome, _ in outcomes] == ["431"] * 8, outcomes
    assert server.memory_mb() - rss_before < 50
    assert server.memory_mb("VmHWM") - max(peak_before, rss_before) < 50
    assert httpx.get(f"{server.url}/health").status_code == 200
    wait_for_log(server, "8 refused, head over MINIVAULT_MAX_HEADER_BYTES")  # one summary line, not eight


def test_a_head_within_the_limit_with_a_body_in_the_same_read_is_served(start) -> None:
    # The limit counts the head only: a head just under it, sent in one write with a 30 KB body, is served;
    # 500 bytes more of header and it is refused.
    server = start({"MINIVAULT_MAX_HEADER_BYTES": "4096"})
    body = orjson.dumps({"prompt": "x" * 30_000})

    def send(filler: int) -> tuple[int, dict[str, str], bytes]:
        head = (
            b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\nX-Filler: %s\r\n\r\n" % (len(body), b"a" * filler)
        )
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(head + body)
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        return parse_response(raw)

    status, _, _ = send(4096 - 200)
    assert status == 200
    status, _, answer = send(4096 + 300)
    assert status == 431
    error = orjson.loads(answer)["error"]
    assert error["code"] == "headers_too_large" and "MINIVAULT_MAX_HEADER_BYTES (4096 bytes)" in error["message"]


async def huge_trailers(port: int, total: int, one_line: bool) -> str:
    """A chunked body whose last chunk is followed by `total` bytes of trailer section (one line, or many)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: ")  # fmt: skip
    piece = b"a" * MB if one_line else (b"X-T: " + b"a" * 40 + b"\r\n") * (MB // 47)
    answer = asyncio.ensure_future(read_until_closed(reader))
    sent = 0
    try:
        while sent < total and not answer.done():
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
    except ConnectionError:
        pass
    assert sent < total, "the server took the whole trailer section"
    status, _, body = parse_response(await asyncio.wait_for(answer, 30))
    writer.close()
    assert orjson.loads(body)["error"]["code"] == "headers_too_large"
    return str(status)


def test_a_chunked_bodys_trailers_count_as_a_head(start) -> None:
    # Trailer lines after the last chunk are buffered like headers (64 MB of them took the plain protocol's
    # peak RSS up by 200-400 MB): the same limit applies to them.
    server = start({"MINIVAULT_MAX_HEADER_BYTES": "8192"})
    httpx.get(f"{server.url}/health").raise_for_status()
    rss_before, peak_before = server.memory_mb(), server.memory_mb("VmHWM")

    async def attack() -> list[str]:
        return await asyncio.gather(*(huge_trailers(server.port, 64 * MB, one_line=i % 2 == 0) for i in range(4)))

    assert asyncio.run(attack()) == ["431"] * 4
    assert server.memory_mb() - rss_before < 50
    assert server.memory_mb("VmHWM") - max(peak_before, rss_before) < 50

    # An honest chunked upload, chunks larger than the limit and a small trailer, is served as before.
    chunks = [b'{"prompt": "', b"x" * 30_000, b'"}']
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\nX-Done: yes\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")  # fmt: skip
        for index in range(0, len(framed), 10_000):
            sock.sendall(framed[index : index + 10_000])
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    status, _, body = parse_response(raw)
    assert status == 200, body


def test_plain_httptools_buffers_huge_heads(start) -> None:
    # The contrast, kept small (2 x 16 MB): without the guard the whole head is held in memory, and the
    # start-up log says the guards are off and how to turn them on.
    server = start(http="httptools")
    assert "connection guards are off" in server.log() and f"--http {GUARDED}" in server.log()
    httpx.get(f"{server.url}/health").raise_for_status()
    rss_before = server.memory_mb()

    async def attack() -> list[tuple[str, int]]:
        return await asyncio.gather(*(huge_head(server.port, 16 * MB) for _ in range(2)))

    outcomes = asyncio.run(attack())
    assert [outcome for outcome, _ in outcomes] == ["sent all", "sent all"]
    deadline = time.monotonic() + 15  # the peak, as the server may have let go of the heads once they closed
    while server.memory_mb("VmHWM") - rss_before <= 50:
        assert time.monotonic() < deadline, f"peak RSS grew only {server.memory_mb('VmHWM') - rss_before:.0f} MB"
        time.sleep(0.1)


# --- slow heads and bodies ---------------------------------------------------------------------------------


async def trickle_head(port: int, before: bytes = b"") -> tuple[int, float, dict]:
    """Send `before` (whole requests), then a head a few bytes every 0.3 s; returns the 408 and its timing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if before:
        writer.write(before)
        await writer.drain()
        status, headers, _ = parse_response(await reader.readuntil(b"\r\n\r\n"))
        await reader.readexactly(int(headers["content-length"]))
        assert status == 200
    started = time.monotonic()
    answer = asyncio.ensure_future(read_until_closed(reader))
    pieces = iter([b"GET /health HTTP/1.1\r\n", *(b"X-Slow: %d\r\n" % i for i in range(100))])
    while not answer.done():
        writer.write(next(pieces))
        await asyncio.wait([answer], timeout=0.3)
    elapsed = time.monotonic() - started
    writer.close()
    status, _, body = parse_response(answer.result())
    return status, elapsed, orjson.loads(body)


async def silent_connection(port: int) -> tuple[int, float, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    raw = await asyncio.wait_for(read_until_closed(reader), 10)
    writer.close()
    status, _, body = parse_response(raw)
    return status, time.monotonic() - started, orjson.loads(body)


async def stalled_body(port: int) -> tuple[int, float, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 40\r\n\r\n{\"prompt\":")  # fmt: skip
    started = time.monotonic()
    raw = await asyncio.wait_for(read_until_closed(reader), 10)
    writer.close()
    status, _, body = parse_response(raw)
    return status, time.monotonic() - started, orjson.loads(body)


async def trickled_body(port: int) -> int:
    """A body sent a byte every 0.3 s, longer in all than the body timeout: never silent for long, so served."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"prompt":"s"}'
    writer.write(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))  # fmt: skip
    for byte in body:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.3)  # the client's pace (what the test is about), not a wait for the server
    status, _, _ = parse_response(await asyncio.wait_for(read_until_closed(reader), 10))
    writer.close()
    return status


def test_slow_heads_and_stalled_bodies_are_closed_with_408(start) -> None:
    server = start({"MINIVAULT_HEADER_TIMEOUT": "1", "MINIVAULT_BODY_TIMEOUT": "1"})
    keep_alive_first = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    async def clients() -> tuple:
        return await asyncio.gather(
            trickle_head(server.port), silent_connection(server.port), trickle_head(server.port, keep_alive_first),
            stalled_body(server.port), trickled_body(server.port),
        )  # fmt: skip

    slow_head, silent, second_head, stalled, trickled = asyncio.run(clients())

    for status, elapsed, body in (slow_head, silent, second_head):
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert "MINIVAULT_HEADER_TIMEOUT (1 s)" in body["error"]["message"]
        assert 0.9 < elapsed < 3.0, elapsed  # 1 s, checked every 0.5 s
    status, elapsed, body = stalled
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert "MINIVAULT_BODY_TIMEOUT (1 s)" in body["error"]["message"]
    assert 0.9 < elapsed < 3.0, elapsed
    assert trickled == 200  # 4.2 s of body, never 1 s without a byte


# --- many slow clients, and the cap ------------------------------------------------------------------------


async def slowloris(port: int, until: float, stats: dict[str, int], body: bool, all_in: asyncio.Event) -> None:
    """One attacker: a connection sending its head (or its body) a byte every 0.5 s; when the server closes
    it, the next one at the next beat, as slowloris does."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        stats["opened"] += 1
        if stats["opened"] == stats["attackers"]:
            all_in.set()
        if body:
            writer.write(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n")  # fmt: skip
        else:
            writer.write(b"GET /health HTTP/1.1\r\n")
        try:
            while time.monotonic() < until:
                writer.write(b"a" if body else b"X")
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(65536), 0.5) == b"":
                        stats["closed"] += 1
                        break
                except TimeoutError:
                    pass  # the beat: nothing from the server in 0.5 s, send the next byte
        except ConnectionError:
            stats["closed"] += 1
        writer.close()
        await asyncio.sleep(0.5)


async def _attack(port: int, attackers: int, seconds: float, report: "multiprocessing.Queue[object]") -> None:
    until = time.monotonic() + seconds
    stats = {"attackers": attackers, "opened": 0, "closed": 0}
    all_in = asyncio.Event()
    tasks = [asyncio.ensure_future(slowloris(port, until, stats, i % 5 == 0, all_in)) for i in range(attackers)]
    await asyncio.wait_for(all_in.wait(), seconds)
    report.put(dict(stats))
    await asyncio.gather(*tasks)
    report.put(stats)


def attack_process(port: int, attackers: int, seconds: float, report: "multiprocessing.Queue[object]") -> None:
    """The attackers, in a process of their own (another machine's worth of event loop)."""
    _raise_own_descriptor_limit()
    asyncio.run(_attack(port, attackers, seconds, report))


async def legitimate(url: str, count: int, spacing: float) -> list[float | None]:
    """`count` prompts, one every `spacing` s, each on a new connection; the latency of each, None if it failed."""
    latencies: list[float | None] = []
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=5, limits=limits) as client:

        async def one() -> None:
            started = time.monotonic()
            try:
                response = await client.post("/generate", json={"prompt": "are you there"})
                ok = response.status_code == 200 and response.json()["response"]
            except httpx.HTTPError:
                ok = False
            latencies.append(time.monotonic() - started if ok else None)

        tasks = []
        for _ in range(count):
            tasks.append(asyncio.ensure_future(one()))
            await asyncio.sleep(spacing)  # the legitimate client's own pace
        await asyncio.gather(*tasks)
    return latencies


def flood(server: MiniVault, attackers: int, seconds: float) -> tuple[list[float | None], dict[str, int]]:
    """`attackers` slow connections for `seconds` (1 in 5 a slow body), and meanwhile 40 legitimate prompts."""
    context = multiprocessing.get_context("spawn")
    report = context.Queue()
    process = context.Process(target=attack_process, args=(server.port, attackers, seconds, report))
    process.start()
    try:
        opened = report.get(timeout=30)
        assert opened["opened"] >= attackers, opened  # all connected before the legitimate client starts
        latencies = asyncio.run(legitimate(server.url, 40, (seconds - 5) / 40))
        stats = report.get(timeout=seconds + 30)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    return latencies, stats


# As many slow connections as the usual descriptor limit (the 1,003 filled it), against a MiniVault
# limited to 1024 descriptors, soft and hard: the default cap leaves room for the upstream's 512 sockets.
ATTACKERS = 1024


def test_a_legitimate_client_keeps_its_answers_during_1024_slow_connections(start) -> None:
    _raise_own_descriptor_limit()
    server = start(nofile=1024)
    assert "within 10 s, bodies silent at most 30 s, 448 connections" in server.log()

    latencies, attack = flood(server, ATTACKERS, 12)

    answered = sorted(latency for latency in latencies if latency is not None)
    assert len(answered) >= 38, f"{len(answered)} of 40 answered"  # at least 95 %
    assert statistics.quantiles(answered, n=100)[98] < 1.0, answered  # p99 under 1 s
    assert attack["closed"] > ATTACKERS  # the attack was real: its connections were closed and came back
    wait_for_log(server, "evicted while sending their head")


def test_without_the_guards_1024_slow_connections_starve_the_legitimate_client(start) -> None:
    # The contrast: plain httptools holds every descriptor, and the legitimate client gets (almost) nothing.
    _raise_own_descriptor_limit()
    server = start(nofile=1024, http="httptools")

    latencies, attack = flood(server, ATTACKERS, 8)

    assert sum(latency is not None for latency in latencies) < 38
    assert attack["closed"] < attack["opened"] // 2  # its connections are held, not timed out


def test_over_the_cap_the_oldest_slow_head_makes_room_else_503(start) -> None:
    server = start({"MINIVAULT_MAX_CONNECTIONS": "50"})

    async def run() -> None:
        heads = []
        for _ in range(60):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            await writer.drain()
            heads.append((reader, writer, asyncio.ensure_future(read_until_closed(reader))))
        # The 10 over the cap pushed out the 10 oldest, each told why.
        deadline = time.monotonic() + 10
        while sum(answer.done() for _, _, answer in heads) < 10:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert [answer.done() for _, _, answer in heads] == [True] * 10 + [False] * 50
        for _, _, answer in heads[:10]:
            status, _, body = parse_response(answer.result())
            assert status == 408 and "MINIVAULT_MAX_CONNECTIONS (50)" in orjson.loads(body)["error"]["message"]
        # A legitimate client still gets its answers: each new connection pushes out the next oldest.
        async with httpx.AsyncClient(base_url=server.url, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            statuses = [(await client.post("/generate", json={"prompt": "hi"})).status_code for _ in range(10)]
        assert statuses == [200] * 10
        done = [answer.done() for _, _, answer in heads]
        assert done == sorted(done, reverse=True) and 11 <= sum(done) <= 20  # always the oldest first
        for _, writer, answer in heads:
            answer.cancel()
            writer.close()

        # 50 connections past their head (bodies arriving slowly): none to push out, so a 51st gets 503.
        bodies = []
        for _ in range(50):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n")  # fmt: skip
            # 100 Continue: the server has parsed the head and the app reads the body.
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b'{"prompt": ')
            bodies.append(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, headers, body = parse_response(await asyncio.wait_for(read_until_closed(reader), 10))
        assert status == 503 and headers["retry-after"] == "1"
        assert orjson.loads(body)["error"]["code"] == "too_many_connections"
        writer.close()
        for writer in bodies:
            writer.close()

    asyncio.run(run())
