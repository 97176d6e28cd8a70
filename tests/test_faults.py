"""Fault tolerance under load: 1,000 mixed REST, SSE and websocket prompts against a real MiniVault process
whose fake Ollama is slow, busy, failing in every documented way, and killed and restarted mid-run."""

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.conftest import read_log
from tests.support.servers import FakeOllamaProcess, bound_socket
from tests.support.sse import aparse_events

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent

# The documented error table: every failure a client may see, and its HTTP status.
STATUS = {
    "busy": 429,
    "backend_unavailable": 503,
    "backend_timeout": 504,
    "backend_error": 502,
    "model_not_found": 404,
    "invalid_request": 422,
}
# What any prompt that reaches the upstream may meet besides its own outcome: a full queue, the
# fake being down (refused), or the fake being killed while it answers (stream cut).
FAULTS = {"busy", "backend_unavailable", "backend_error"}
# kind -> (model, the outcome when nothing else goes wrong); None is the default model.
KINDS: dict[str, tuple[str | None, str]] = {
    "echo": (None, "ok"),
    "echo-llama3": ("llama3", "ok"),
    "ollama-busy": ("busy", "busy"),
    "error-line": ("error-line", "backend_error"),
    "break": ("break", "backend_error"),
    "no-done": ("no-done", "backend_error"),
    "garbage": ("garbage", "backend_error"),
    "fail-500": ("fail-500", "backend_error"),
    "absent": ("absent-model", "model_not_found"),
    "stall": ("stall", "backend_timeout"),
    "stall-headers": ("stall-headers", "backend_timeout"),
    "blank": (None, "invalid_request"),
}
WEIGHTS = {"echo": 40, "echo-llama3": 8, "ollama-busy": 5, "error-line": 6, "break": 6, "no-done": 6, "garbage": 6,
           "fail-500": 5, "absent": 6, "stall": 2, "stall-headers": 2, "blank": 8}  # fmt: skip
CONCURRENCY = 32
PROMPTS_PER_SOCKET = 4
KILLS_AT = (150, 450, 750)  # completed prompts of the main run at which the fake is killed
UNAVAILABLE_PER_OUTAGE = 5  # prompts refused with backend_unavailable before the fake comes back
RSS_GROWTH_LIMIT_MB = 50
DEADLINE = 80.0


@dataclass
class Prompt:
    id: str
    kind: str
    text: str

    def body(self) -> dict[str, Any]:
        model = KINDS[self.kind][0]
        return {"prompt": self.text, **({"model": model} if model else {})}


@dataclass
class Outcome:
    id: str
    kind: str
    endpoint: str
    code: str  # "ok" or an error code
    status: int  # HTTP status; 200 for results and for errors inside a stream that had started
    message: str
    started: float
    ended: float


class Gateway:
    """MiniVault as `uvicorn app.main:app` in its own process, so its RSS is its own."""

    def __init__(self, upstream: str, log_path: Path) -> None:
        self.log_path = log_path
        self.sock = bound_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIVAULT_", "OLLAMA_", "PROMETHEUS_"))}
        # 8 slots and 20 places in the queue for 32 clients: the 429 path is hit without crowding out the rest.
        env.update({
            "MINIVAULT_BACKEND": "ollama", "OLLAMA_BASE_URL": upstream, "MINIVAULT_LOG_PATH": str(log_path),
            "MINIVAULT_MAX_CONCURRENCY": "8", "MINIVAULT_MAX_QUEUE": "20", "MINIVAULT_FIRST_TOKEN_TIMEOUT": "2",
            "MINIVAULT_IDLE_TIMEOUT": "2", "MINIVAULT_TOTAL_TIMEOUT": "15", "MINIVAULT_SHUTDOWN_GRACE": "5",
            "MINIVAULT_LOG_FORMAT": "json",
        })  # fmt: skip
        # A file, not a pipe: every upstream failure prints a line, and a full pipe would stall the server.
        self.output: IO[bytes] = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--fd", str(self.sock.fileno()),
             "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=env, pass_fds=[self.sock.fileno()], stdout=self.output, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS in /proc status")

    def stop(self) -> int:
        """SIGTERM (drain, flush the log) and wait; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def server_log(self) -> list[dict[str, Any]]:
        self.output.seek(0)
        return [orjson.loads(line) for line in self.output.read().splitlines() if line.startswith(b"{")]

    def close(self) -> None:
        self.stop()
        self.sock.close()
        self.output.close()


@pytest.fixture
def fake_process() -> Iterator[FakeOllamaProcess]:
    # 10 ms between tokens: an echo answer takes 40-80 ms, long enough for slots and the queue to fill.
    with FakeOllamaProcess(delay=0.01) as fake:
        yield fake


@pytest.fixture
def gateway(fake_process: FakeOllamaProcess, tmp_path: Path) -> Iterator[Gateway]:
    gateway = Gateway(fake_process.url, tmp_path / "log.jsonl")
    try:
        yield gateway
    finally:
        gateway.close()


def plan(prefix: str, count: int, rng: random.Random) -> list[tuple[str, list[Prompt]]]:
    """`count` prompts as jobs: 40% REST, 30% SSE, 30% websocket (PROMPTS_PER_SOCKET per connection), shuffled."""
    kinds = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()), k=count)
    prompts = []
    for index, kind in enumerate(kinds):
        words = " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "épsilon")) for _ in range(rng.randint(3, 7)))
        text = " \t " if kind == "blank" else f"{prefix}{index} {words}"
        prompts.append(Prompt(f"{prefix}-{index}", kind, text))
    rest, sse = count * 4 // 10, count * 3 // 10
    jobs: list[tuple[str, list[Prompt]]] = [("rest", [p]) for p in prompts[:rest]]
    jobs += [("sse", [p]) for p in prompts[rest : rest + sse]]
    sockets = prompts[rest + sse :]
    jobs += [("ws", sockets[i : i + PROMPTS_PER_SOCKET]) for i in range(0, len(sockets), PROMPTS_PER_SOCKET)]
    rng.shuffle(jobs)
    return jobs


def ended(prompt: Prompt, endpoint: str, started: float, status: int, error: dict[str, Any] | None = None) -> Outcome:
    """The outcome of one prompt; `error` is the error object the client got, checked against the table."""
    if error is None:
        return Outcome(prompt.id, prompt.kind, endpoint, "ok", status, "", started, anyio.current_time())
    assert error["id"] == prompt.id
    assert error["code"] in STATUS, error
    assert error["message"]
    if error["code"] == "busy":
        assert error["retry_after"] >= 1
    return Outcome(prompt.id, prompt.kind, endpoint, error["code"], status, error["message"], started,
                   anyio.current_time())  # fmt: skip


async def call_rest(client: httpx.AsyncClient, prompt: Prompt) -> Outcome:
    started = anyio.current_time()
    response = await client.post("/generate", json=prompt.body(), headers={"X-Request-ID": prompt.id})
    assert response.headers["x-request-id"] == prompt.id
    if response.status_code == 200:
        body = response.json()
        assert (body["id"], body["response"], body["done_reason"]) == (prompt.id, prompt.text, "stop")
        return ended(prompt, "rest", started, 200)
    if response.status_code == 429:
        assert int(response.headers["retry-after"]) >= 1
    return ended(prompt, "rest", started, response.status_code, response.json()["error"])


async def call_sse(client: httpx.AsyncClient, prompt: Prompt) -> Outcome:
    started = anyio.current_time()
    body = {**prompt.body(), "stream": True}
    async with client.stream("POST", "/generate", json=body, headers={"X-Request-ID": prompt.id}) as response:
        assert response.headers["x-request-id"] == prompt.id
        if response.status_code != 200:
            await response.aread()
            return ended(prompt, "sse", started, response.status_code, orjson.loads(response.content)["error"])
        events = [event async for event in aparse_events(response)]
    *middle, (last, data) = events
    names = [name for name, _ in middle]
    assert names == sorted(names, key=lambda name: name != "queued"), names  # queued first, then tokens
    assert set(names) <= {"queued", "token"}
    if last == "error":
        return ended(prompt, "sse", started, 200, data["error"])
    assert last == "done"
    text = "".join(item["content"] for name, item in middle if name == "token")
    assert (data["id"], data["response"], text) == (prompt.id, prompt.text, prompt.text)
    return ended(prompt, "sse", started, 200)


async def call_ws(url: str, prompts: list[Prompt]) -> list[Outcome]:
    outcomes = []
    async with connect(f"{url}/ws/generate") as ws:
        for prompt in prompts:
            started = anyio.current_time()
            await ws.send(orjson.dumps({**prompt.body(), "id": prompt.id}).decode())
            frames = [orjson.loads(await ws.recv())]
            while frames[-1]["type"] not in ("done", "error"):
                frames.append(orjson.loads(await ws.recv()))
            *middle, last = frames
            if prompt.kind == "blank":
                assert middle == []  # refused before it started
            else:
                model = prompt.body().get("model", "tinyllama:1.1b-chat")
                assert middle[0] == {"type": "start", "id": prompt.id, "model": model}
                types = [frame["type"] for frame in middle[1:]]
                assert types == sorted(types, key=lambda kind: kind != "queued"), types
                assert set(types) <= {"queued", "token"}
            if last["type"] == "error":
                outcomes.append(ended(prompt, "ws", started, 200, last))
                continue
            text = "".join(frame["content"] for frame in middle if frame["type"] == "token")
            assert (last["id"], last["response"], text) == (prompt.id, prompt.text, prompt.text)
            outcomes.append(ended(prompt, "ws", started, 200))
    return outcomes


async def run_load(url: str, jobs: list[tuple[str, list[Prompt]]], progress: "Progress") -> list[Outcome]:
    """Run every job, CONCURRENCY at a time; each prompt's outcome is reported to `progress` as it ends."""
    outcomes: list[Outcome] = []
    queue = list(reversed(jobs))
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def worker() -> None:
            while queue:
                endpoint, prompts = queue.pop()
                if endpoint == "rest":
                    done = [await call_rest(client, prompts[0])]
                elif endpoint == "sse":
                    done = [await call_sse(client, prompts[0])]
                else:
                    done = await call_ws(url.replace("http", "ws", 1), prompts)
                outcomes.extend(done)
                await progress.add(done)

        async with anyio.create_task_group() as group:
            for _ in range(CONCURRENCY):
                group.start_soon(worker)
    return outcomes


class Progress:
    """Counts finished prompts; the chaos task waits on it instead of on the clock."""

    def __init__(self) -> None:
        self.done = 0
        self.unavailable = 0
        self._changed = asyncio.Condition()

    async def add(self, outcomes: list[Outcome]) -> None:
        async with self._changed:
            self.done += len(outcomes)
            self.unavailable += sum(outcome.code == "backend_unavailable" for outcome in outcomes)
            self._changed.notify_all()

    async def reach(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.done >= count)

    async def unavailable_again(self, count: int) -> None:
        async with self._changed:
            target = self.unavailable + count
            await self._changed.wait_for(lambda: self.unavailable >= target)


async def chaos(fake: FakeOllamaProcess, progress: Progress, outages: list[tuple[float, float]]) -> None:
    """SIGKILL the fake at each KILLS_AT mark; start it again on the same port once prompts have met it down."""
    for mark in KILLS_AT:
        await progress.reach(mark)
        started = anyio.current_time()
        await anyio.to_thread.run_sync(fake.kill)
        await progress.unavailable_again(UNAVAILABLE_PER_OUTAGE)
        await anyio.to_thread.run_sync(fake.start)
        outages.append((started, anyio.current_time()))


def allowed(kind: str) -> set[str]:
    own = KINDS[kind][1]
    # A blank prompt is refused before admission, so no upstream fault can touch it.
    return {own} if kind == "blank" else {own} | FAULTS


def during_outage(outcome: Outcome, outages: list[tuple[float, float]]) -> bool:
    return any(outcome.started < end and outcome.ended > start for start, end in outages)


async def test_1000_mixed_prompts_survive_upstream_faults_and_restarts(
    gateway: Gateway, fake_process: FakeOllamaProcess
) -> None:
    rng = random.Random(8)
    outages: list[tuple[float, float]] = []
    with anyio.fail_after(DEADLINE):
        warm_up = await run_load(gateway.url, plan("warm", 100, rng), Progress())
        rss_before = gateway.rss_mb()
        progress = Progress()
        async with anyio.create_task_group() as group:
            group.start_soon(chaos, fake_process, progress, outages)
            outcomes = await run_load(gateway.url, plan("run", 1000, rng), progress)
        rss_after = gateway.rss_mb()
    assert await anyio.to_thread.run_sync(gateway.stop) in (0, -signal.SIGTERM)

    counts = Counter(outcome.code for outcome in outcomes)
    queue_full = sum("MINIVAULT_MAX_QUEUE" in outcome.message for outcome in outcomes)
    growth = rss_after - rss_before
    print(f"\noutcomes of 1000 prompts: {dict(sorted(counts.items()))} (busy from MiniVault's queue: {queue_full})")
    print(f"by endpoint: {dict(sorted(Counter((o.endpoint, o.code) for o in outcomes).items()))}")
    print(f"by kind: {dict(sorted(Counter((o.kind, o.code) for o in outcomes).items()))}")
    print(f"fake killed and restarted {len(outages)} times; down for "
          f"{', '.join(f'{end - start:.2f} s' for start, end in outages)}")  # fmt: skip
    print(f"MiniVault RSS after 100 warm-up prompts {rss_before:.1f} MB, after 1000 more {rss_after:.1f} MB "
          f"(growth {growth:+.1f} MB)")  # fmt: skip

    assert len(outages) == len(KILLS_AT)
    assert fake_process.running
    assert len(warm_up) == 100
    assert len(outcomes) == 1000
    assert Counter(outcome.endpoint for outcome in outcomes) == {"rest": 400, "sse": 300, "ws": 300}
    everything = warm_up + outcomes
    for outcome in everything:
        assert outcome.code in allowed(outcome.kind), outcome
        if outcome.status != 200:
            assert STATUS[outcome.code] == outcome.status, outcome
        if outcome.code == "busy" and outcome.kind != "ollama-busy":
            assert "MINIVAULT_MAX_QUEUE" in outcome.message, outcome
        if outcome.code == "backend_unavailable" or (outcome.code == "backend_error" != KINDS[outcome.kind][1]):
            # Only the fake's death explains these; once it is back, the gateway recovers at once.
            assert during_outage(outcome, outages), outcome
    # Every path was taken: results, MiniVault's own 429, the fake down, and each upstream failure.
    assert set(counts) | {outcome.code for outcome in warm_up} == {"ok", *STATUS}, counts
    assert 0 < queue_full < counts["busy"]

    lines = read_log(gateway.log_path)
    assert len(lines) == len(everything)
    by_id = {line["id"]: line for line in lines}
    assert len(by_id) == len(lines)
    for outcome in everything:
        line = by_id[outcome.id]
        # A refused body is logged before MiniVault reads `stream`, so a blank SSE prompt logs as rest.
        refused_sse = (outcome.kind, outcome.endpoint) == ("blank", "sse")
        assert line["endpoint"] == ("rest" if refused_sse else outcome.endpoint)
        if outcome.code == "ok":
            assert (line["status"], line["error"]) == ("ok", None), line
        else:
            assert (line["status"], line["error"]["code"]) == ("error", outcome.code), line
    assert [entry for entry in gateway.server_log() if entry["level"] in ("error", "critical")] == []
    assert growth < RSS_GROWTH_LIMIT_MB
