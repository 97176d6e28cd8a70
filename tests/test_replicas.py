"""Two MiniVault replicas as real uvicorn processes sharing one PostgreSQL, one Redis and one fake Ollama: the
fleet's concurrency limit, queue and rate limit, a conversation and the history across replicas, a killed
replica's slots coming back after their lease, and one conversation's writers serialized across replicas."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
import psycopg
import pytest
import redis

from app.store.pg_conversations import lock_key
from app.store.pg_schema import SCHEMA_VERSION
from app.web.auth import key_id
from tests.support.fake_ollama import FakeOllama
from tests.support.postgres import PostgresServer
from tests.support.redis_server import RedisServer
from tests.support.servers import REPO_ROOT, RunningServer, bound_socket, serve_in_thread
from tests.support.sse import aparse_events

pytestmark = pytest.mark.anyio

START_WITHIN = 30.0  # seconds for a replica to import, migrate and answer /ready 200
STOP_WITHIN = 10.0
STEP = 10.0  # generous bound on any step that should take milliseconds
SLOTS, QUEUE = "minivault:{admission}:slots", "minivault:{admission}:queue"
# The module's fleet keeps its limits in a Redis database of its own, apart from the per-test `redis_url` (0).
FLEET_REDIS_DB = 1
# One key per purpose: the fleet's rate limit (3 a minute) counts each key apart, so tests never share a budget.
KEYS = [
    *(f"key-limit-{n}" for n in range(1, 6)),
    "key-rate",
    "key-rate-other",
    "key-talk",
    "key-history",
    "key-writers",
]
SLOW = {"prompt": "go on", "model": "slow", "stream": True}  # 400 tokens, 20 ms apart: runs 8 s unless closed


class CountingFake(FakeOllama):
    """The fake Ollama, also keeping the most answers it ever had in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def _count(self, field: str) -> None:
        super()._count(field)
        with self._changed:
            self.peak = max(self.peak, self.active)

    def reset(self) -> None:
        """Forget every request and count, once nothing is in flight (a closed stream is noticed a moment later)."""
        self.wait_until(lambda fake: fake.active == 0)
        with self._changed:
            self.requests.clear()
            self.started = self.finished = self.disconnects = self.peak = 0


@dataclass
class Replica:
    """One `uvicorn app.main:app` process; its output goes to a file nobody has to read while it runs."""

    name: str
    url: str
    process: "subprocess.Popen[bytes]"
    output: IO[bytes]

    def output_text(self) -> str:
        self.output.seek(0)
        return self.output.read().decode(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL, as when the machine or the OOM killer takes it: nothing is given back."""
        self.process.kill()
        self.process.wait(timeout=STOP_WITHIN)


def launch(name: str, env: dict[str, str]) -> Replica:
    """Start a replica on a loopback socket bound here, so clients may connect before it serves."""
    sock = bound_socket()
    output = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--fd", str(sock.fileno()), "--log-level", "warning",
         "--no-access-log"],
        cwd=REPO_ROOT, env=env, pass_fds=[sock.fileno()], stdout=output, stderr=subprocess.STDOUT,
    )  # fmt: skip
    replica = Replica(name, f"http://127.0.0.1:{sock.getsockname()[1]}", process, output)
    # The process has its own copy; once it dies, connecting is refused instead of waiting in our backlog.
    sock.close()
    return replica


def wait_ready(replica: Replica, deadline: float) -> None:
    """Poll /ready until 200; fail with the replica's output if it exits or the deadline passes."""
    with httpx.Client(timeout=1.0) as client:
        while True:
            if replica.process.poll() is not None:
                raise RuntimeError(f"replica {replica.name} exited ({replica.process.returncode}):\n"
                                   f"{replica.output_text()}")  # fmt: skip
            try:
                if client.get(f"{replica.url}/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # still importing or migrating: the connection waits in the backlog
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica.name} was not ready within {START_WITHIN} s:\n"
                                   f"{replica.output_text()}")  # fmt: skip
            time.sleep(0.05)  # polling interval while the child starts


@contextmanager
def replicas(*envs: dict[str, str]) -> Iterator[list[Replica]]:
    """Start one replica per environment, all at once; yield once all are ready, then stop them together."""
    started: list[Replica] = []
    try:
        for name, env in zip("ABCDEFGH", envs, strict=False):
            started.append(launch(name, env))
        deadline = time.monotonic() + START_WITHIN
        for replica in started:
            wait_ready(replica, deadline)
        yield started
    finally:
        for replica in started:
            if replica.process.poll() is None:
                replica.process.terminate()
        for replica in started:
            try:
                replica.process.wait(timeout=STOP_WITHIN)
            except subprocess.TimeoutExpired:
                replica.kill()
            replica.output.close()


def replica_env(upstream: str, database_url: str, redis_url: str, log_path: Path, **settings: str) -> dict[str, str]:
    """A replica's environment: this one's settings over the inherited one, minus the developer's MiniVault knobs."""
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MINIVAULT_", "OLLAMA_", "OPENAI_")) and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    return {
        **inherited,
        "MINIVAULT_BACKEND": "ollama",
        "OLLAMA_BASE_URL": upstream,
        "MINIVAULT_DATABASE_URL": database_url,
        "MINIVAULT_REDIS_URL": redis_url,
        "MINIVAULT_LOG_PATH": str(log_path),
        "MINIVAULT_DB_PATH": str(log_path.with_suffix(".db")),  # unused with PostgreSQL; never the repository's
        "MINIVAULT_SHUTDOWN_GRACE": "2",  # a test that fails mid-stream still stops its replicas quickly
        **settings,
    }


def fleet_counts(server: RedisServer, db: int) -> tuple[int, int]:
    """Slots taken and places queued in the fleet, as Redis holds them."""
    with redis.Redis(host="127.0.0.1", port=server.port, db=db) as client:
        return client.zcard(SLOTS), client.zcard(QUEUE)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def until(condition: Callable[[], bool], what: str, within: float = STEP) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await anyio.sleep(0.01)  # polling interval: other processes change what is looked at


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[CountingFake, RunningServer]]:
    """One fake Ollama for every replica of the module, in this process so its counts can be read."""
    fake = CountingFake()
    with serve_in_thread(fake, lifespan="off") as server:
        yield fake, server


@pytest.fixture(autouse=True)
def ollama(upstream: tuple[CountingFake, RunningServer]) -> CountingFake:
    """The shared fake, idle and with every count at zero for this test."""
    fake, _ = upstream
    fake.reset()
    return fake


@dataclass(frozen=True)
class Fleet:
    a: Replica
    b: Replica
    database: str
    database_url: str


@pytest.fixture(scope="module")
def fleet(
    upstream: tuple[CountingFake, RunningServer],
    postgres: PostgresServer,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    """Two replicas started at once on an empty database: 2 slots and 1 queue place for both, 3 prompts a
    minute per key, and the keys in KEYS."""
    database = f"fleet_{os.getpid()}"
    with postgres.admin() as admin:
        admin.execute(f"CREATE DATABASE {database} OWNER {postgres.owner} TEMPLATE template0 STRATEGY file_copy")
    logs = tmp_path_factory.mktemp("fleet")
    settings = {
        "MINIVAULT_MAX_CONCURRENCY": "2",
        "MINIVAULT_MAX_QUEUE": "1",
        "MINIVAULT_RATE_LIMIT": "3",
        "MINIVAULT_API_KEYS": ",".join(KEYS),
    }
    redis_url = f"redis://127.0.0.1:{redis_server.port}/{FLEET_REDIS_DB}"
    envs = [replica_env(upstream[1].url, postgres.url(database), redis_url, logs / f"{name}.jsonl", **settings)
            for name in ("a", "b")]  # fmt: skip
    try:
        with replicas(*envs) as (a, b):
            yield Fleet(a, b, database, postgres.url(database))
    finally:
        with postgres.admin() as admin:
            admin.execute(f"DROP DATABASE {database} WITH (FORCE)")


async def test_both_replicas_started_at_once_on_an_empty_database_are_ready_with_the_schema_made_once(
    fleet: Fleet,
) -> None:
    async with httpx.AsyncClient(timeout=STEP) as client:
        for replica in (fleet.a, fleet.b):
            ready = await client.get(f"{replica.url}/ready")
            assert (ready.status_code, ready.json()["status"]) == (200, "ready")
    with psycopg.connect(fleet.database_url) as db:
        # One version row; a second full migration would have failed on CREATE TEXT SEARCH CONFIGURATION.
        assert db.execute("SELECT version FROM minivault_schema").fetchall() == [(SCHEMA_VERSION,)]
        tables = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()
        assert tables == [("conversations",), ("exchanges",), ("minivault_schema",), ("turns",)]
        assert db.execute("SELECT count(*) FROM pg_ts_config WHERE cfgname = 'minivault_text'").fetchone() == (1,)


async def test_the_concurrency_limit_and_queue_hold_across_both_replicas(
    fleet: Fleet, ollama: CountingFake, redis_server: RedisServer
) -> None:
    a, b = fleet.a, fleet.b
    async with httpx.AsyncClient(timeout=STEP) as client, AsyncExitStack() as streams:

        async def open_stream(replica: Replica, key: str) -> httpx.Response:
            return await streams.enter_async_context(
                client.stream("POST", f"{replica.url}/generate", json=SLOW, headers=auth(key))
            )

        first = await open_stream(a, "key-limit-1")
        second = await open_stream(b, "key-limit-2")
        assert (first.status_code, second.status_code) == (200, 200)
        await until(lambda: ollama.started == 2, "both slots' answers reached the fake")

        third = await open_stream(a, "key-limit-3")
        assert third.status_code == 200
        third_events = await streams.enter_async_context(aclosing(aparse_events(third)))
        with anyio.fail_after(STEP):
            assert await anext(third_events) == ("queued", {"position": 1})
        assert fleet_counts(redis_server, FLEET_REDIS_DB) == (2, 1)

        # The fleet's one queue place is taken: a fourth prompt is refused at once, on either replica.
        for replica, key in ((b, "key-limit-4"), (a, "key-limit-5")):
            refused = await client.post(f"{replica.url}/generate", json=SLOW, headers=auth(key))
            assert refused.status_code == 429
            error = refused.json()["error"]
            assert error["code"] == "busy"
            assert error["message"].startswith(
                "MiniVault is busy: 2 generations are running and 1 are queued "
                "(MINIVAULT_MAX_CONCURRENCY=2, MINIVAULT_MAX_QUEUE=1)"
            )
            assert int(refused.headers["Retry-After"]) == error["retry_after"] >= 1
        assert (ollama.started, ollama.active) == (2, 2)
        assert fleet_counts(redis_server, FLEET_REDIS_DB) == (2, 1)

        # B's stream ends: its slot goes to the prompt queued on A.
        await second.aclose()
        with anyio.fail_after(STEP):
            event, data = await anext(third_events)
        assert (event, data) == ("token", {"content": "w0 "})
        await until(lambda: (ollama.started, ollama.disconnects) == (3, 1), "the queued answer reached the fake")
        assert ollama.active == 2
        assert fleet_counts(redis_server, FLEET_REDIS_DB) == (2, 0)


async def test_the_rate_limit_holds_across_both_replicas_per_key(fleet: Fleet, ollama: CountingFake) -> None:
    a, b = fleet.a, fleet.b
    async with httpx.AsyncClient(timeout=STEP) as client:
        for n, replica in enumerate((a, b, a)):
            answered = await client.post(f"{replica.url}/generate", json={"prompt": f"count {n}"},
                                         headers=auth("key-rate"))  # fmt: skip
            assert (answered.status_code, answered.json()["response"]) == (200, f"count {n}")
        for replica in (b, a):
            refused = await client.post(f"{replica.url}/generate", json={"prompt": "more"}, headers=auth("key-rate"))
            assert refused.status_code == 429
            error = refused.json()["error"]
            assert error["code"] == "rate_limited"
            assert error["message"].startswith(
                "rate limit: at most 3 prompts per minute per API key (MINIVAULT_RATE_LIMIT=3)"
            )
            # Three at once spend the minute's budget; the next is due 60/3 s after the first.
            assert 0 < int(refused.headers["Retry-After"]) == error["retry_after"] <= 20
        other = await client.post(f"{b.url}/generate", json={"prompt": "another key"}, headers=auth("key-rate-other"))
        assert (other.status_code, other.json()["response"]) == (200, "another key")
    assert ollama.started == 4  # the refused prompts never reached the upstream


async def test_a_conversation_continues_on_the_other_replica(fleet: Fleet, ollama: CountingFake) -> None:
    a, b = fleet.a, fleet.b
    conversation = f"across-{uuid.uuid4().hex}"
    prompts = ["Where is the lighthouse?", "And how tall is it?"]
    answers = []
    async with httpx.AsyncClient(timeout=STEP, headers=auth("key-talk")) as client:
        for replica, prompt in zip((a, b), prompts, strict=True):
            body = {"prompt": prompt, "model": "slow", "options": {"num_predict": 3}, "conversation_id": conversation}
            answered = await client.post(f"{replica.url}/generate", json=body)
            assert (answered.status_code, answered.json()["response"]) == (200, "w0 w1 w2 ")
            answers.append(answered.json())
        # B sent A's turn along with its own prompt.
        assert [request["messages"] for request in ollama.requests] == [
            [{"role": "user", "content": prompts[0]}],
            [{"role": "user", "content": prompts[0]}, {"role": "assistant", "content": "w0 w1 w2 "},
             {"role": "user", "content": prompts[1]}],
        ]  # fmt: skip
        for replica in (a, b):
            shown = await client.get(f"{replica.url}/conversations/{conversation}")
            assert shown.status_code == 200
            assert [(turn["prompt"], turn["response"], turn["exchange_id"]) for turn in shown.json()["turns"]] == [
                (prompts[0], "w0 w1 w2 ", answers[0]["id"]),
                (prompts[1], "w0 w1 w2 ", answers[1]["id"]),
            ]


async def test_history_written_by_one_replica_is_searchable_from_the_other(fleet: Fleet) -> None:
    word = f"zebra{uuid.uuid4().hex[:12]}"
    async with httpx.AsyncClient(timeout=STEP, headers=auth("key-history")) as client:
        answered = await client.post(f"{fleet.a.url}/generate", json={"prompt": f"remember {word} please"})
        assert answered.status_code == 200
        # The history's writer commits in the background (about every 0.1 s): poll B until it does.
        deadline = time.monotonic() + STEP
        while True:
            found = await client.get(f"{fleet.b.url}/history", params={"q": word})
            assert found.status_code == 200
            if found.json()["items"]:
                break
            assert time.monotonic() < deadline, f"B never found {word!r} in the history"
            await anyio.sleep(0.02)  # polling interval: A's writer commits on its own schedule
    [item] = found.json()["items"]
    assert (item["id"], item["prompt"], item["response"]) == (answered.json()["id"], f"remember {word} please",
                                                              f"remember {word} please")  # fmt: skip
    assert (item["endpoint"], item["status"], item["key_id"]) == ("rest", "ok", key_id("key-history"))
    assert found.json()["next_cursor"] is None


async def test_two_writers_to_one_conversation_on_two_replicas_take_turns(fleet: Fleet, ollama: CountingFake) -> None:
    conversation = f"writers-{uuid.uuid4().hex}"
    prompts = {"a": "Tell me about tides.", "b": "Tell me about waves."}
    answers: dict[str, httpx.Response] = {}

    async with httpx.AsyncClient(timeout=STEP, headers=auth("key-writers")) as client:

        async def send(name: str, replica: Replica) -> None:
            # 50 tokens 20 ms apart: each answer takes a second, so the two prompts surely overlap.
            body = {"prompt": prompts[name], "model": "slow", "options": {"num_predict": 50},
                    "conversation_id": conversation}  # fmt: skip
            answers[name] = await client.post(f"{replica.url}/generate", json=body)

        async with (
            await psycopg.AsyncConnection.connect(fleet.database_url, autocommit=True) as db,
            anyio.create_task_group() as group,
        ):
            group.start_soon(send, "a", fleet.a)
            group.start_soon(send, "b", fleet.b)
            # While one answer streams, the other prompt waits on the conversation's lock in PostgreSQL:
            # held by one session, awaited by another (a bigint advisory key is split over classid and objid).
            key = lock_key(conversation) & 0xFFFFFFFFFFFFFFFF
            deadline = time.monotonic() + STEP
            while True:
                cursor = await db.execute(
                    "SELECT count(*) FILTER (WHERE granted), count(*) FILTER (WHERE NOT granted) FROM pg_locks "
                    "JOIN pg_database ON pg_database.oid = pg_locks.database WHERE datname = %s "
                    "AND locktype = 'advisory' AND classid = %s::bigint::oid AND objid = %s::bigint::oid "
                    "AND objsubid = 1",
                    (fleet.database, key >> 32, key & 0xFFFFFFFF),
                )
                locks = await cursor.fetchone()
                if (locks, ollama.active) == ((1, 1), 1):
                    break
                assert time.monotonic() < deadline, f"never saw one writer waiting for the other: {locks}"
                await anyio.sleep(0.01)  # polling interval: both replicas move on their own

    assert {name: response.status_code for name, response in answers.items()} == {"a": 200, "b": 200}
    assert (ollama.started, ollama.finished, ollama.peak) == (2, 2, 1)
    async with httpx.AsyncClient(timeout=STEP, headers=auth("key-writers")) as client:
        shown = await client.get(f"{fleet.b.url}/conversations/{conversation}")
    assert shown.status_code == 200
    turns = shown.json()["turns"]
    assert len(turns) == 2
    order = {answers[name].json()["id"]: name for name in answers}
    first, second = (order[turn["exchange_id"]] for turn in turns)
    answer = "".join(f"w{i} " for i in range(50))
    assert [(turn["prompt"], turn["response"]) for turn in turns] == [(prompts[first], answer),
                                                                      (prompts[second], answer)]  # fmt: skip
    # The second writer's request carried the first one's turn.
    assert [request["messages"] for request in ollama.requests] == [
        [{"role": "user", "content": prompts[first]}],
        [{"role": "user", "content": prompts[first]}, {"role": "assistant", "content": answer},
         {"role": "user", "content": prompts[second]}],
    ]  # fmt: skip


async def test_a_killed_replicas_slots_come_back_once_their_leases_expire(
    upstream: tuple[CountingFake, RunningServer],
    ollama: CountingFake,
    pg_url: str,
    redis_url: str,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    settings = {"MINIVAULT_MAX_CONCURRENCY": "2", "MINIVAULT_MAX_QUEUE": "4", "MINIVAULT_SLOT_LEASE_SECONDS": "2"}
    envs = [replica_env(upstream[1].url, pg_url, redis_url, tmp_path / f"{name}.jsonl", **settings)
            for name in ("a", "b")]  # fmt: skip
    with replicas(*envs) as (a, b):
        async with httpx.AsyncClient(timeout=STEP) as client, AsyncExitStack() as streams:
            for _ in range(2):
                held = await streams.enter_async_context(client.stream("POST", f"{a.url}/generate", json=SLOW))
                assert held.status_code == 200
            await until(lambda: ollama.started == 2, "A's two answers reached the fake")
            assert fleet_counts(redis_server, 0) == (2, 0)

            a.kill()
            killed = time.monotonic()
            assert a.process.returncode == -signal.SIGKILL
            assert fleet_counts(redis_server, 0) == (2, 0)  # nothing given back: the leases still run

            body = {"prompt": "after the crash", "stream": True}
            async with client.stream("POST", f"{b.url}/generate", json=body) as late:
                assert late.status_code == 200
                with anyio.fail_after(STEP):
                    received: list[tuple[str, Any]] = [event async for event in aparse_events(late)]
            admitted_within = time.monotonic() - killed

        # Queued first (A's leases were still running), then admitted once they expired.
        assert received[0] == ("queued", {"position": 1})
        assert received[1:-1] == [("token", {"content": word}) for word in ("after ", "the ", "crash")]
        event, done = received[-1]
        assert (event, done["response"]) == ("done", "after the crash")
        assert done["timings"]["queue_ms"] > 0
        assert admitted_within < 7.0, f"admitted {admitted_within:.2f} s after the kill (lease 2 s)"
        await until(lambda: fleet_counts(redis_server, 0) == (0, 0), "B gave its slot back and A's expired")
        assert b.process.poll() is None
