"""MINIVAULT_AUTO_PULL: the default model pulled at start-up, progress in /ready, prompts refused
meanwhile with 503 model_loading, failures reported and retried with backoff."""

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from websockets.sync.client import connect

from app.backends import BackendStatus
from app.core import autopull as bootstrap
from app.core.autopull import ModelBootstrap
from app.errors import BackendError, ModelLoading
from app.main import create_app
from app.serverlog import configure_server_log
from tests.conftest import closed_port_url, make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import FakeOllamaProcess, RunningServer, free_port, poll_ready, serve_in_thread

MODEL = "tinyllama:1.1b-chat"
WAIT = 15.0  # generous: these machines are noisy


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bootstrap, "RETRY_BASE", 0.05)


@pytest.fixture
def output(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    # A JSON-format server log elsewhere in the session turns propagation off; create_app turns it back on.
    caplog.set_level(logging.INFO, logger="app")
    return caplog


def bootstrap_lines(caplog: pytest.LogCaptureFixture, level: int | None = None) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "app.core.autopull" and (level is None or record.levelno == level)
    ]


@contextmanager
def gateway(url: str, log_path: Path, **overrides: Any) -> Iterator[tuple[RunningServer, FastAPI]]:
    settings = make_settings(ollama_base_url=url, log_path=log_path, db_path=log_path.with_name("minivault.db"),
                             **{"auto_pull": True, **overrides})  # fmt: skip
    app = create_app(settings)
    with serve_in_thread(app) as server:
        yield server, app


def wait_for_phase(app: FastAPI, phase: str) -> None:
    deadline = time.monotonic() + WAIT
    # The server accepts connections before its lifespan has built the bootstrap.
    while getattr(getattr(app.state, "bootstrap", None), "phase", None) != phase:
        assert time.monotonic() < deadline, f"the bootstrap never reached {phase}"
        time.sleep(0.01)


def ws_generate(server: RunningServer, prompt: str) -> list[dict[str, Any]]:
    with connect(f"{server.ws_url}/ws/generate") as ws:
        ws.send(json.dumps({"prompt": prompt}))
        frames = [json.loads(ws.recv())]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(ws.recv()))
    return frames


def test_missing_model_is_pulled_with_progress_in_ready_and_prompts_refused_meanwhile(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, output: pytest.LogCaptureFixture
) -> None:
    fake.models.remove(MODEL)
    fake.pulled.clear()
    try:
        with gateway(fake_server.url, log_path) as (server, _):
            pulling = poll_ready(server, lambda r: r.json().get("completed") == 318_500_000)
            rest = httpx.post(f"{server.url}/generate", json={"prompt": "too soon"})
            sse = httpx.post(f"{server.url}/generate", json={"prompt": "too soon", "stream": True})
            frames = ws_generate(server, "too soon")
            fake.pulled.set()
            ready = poll_ready(server, lambda r: r.status_code == 200)
            after = httpx.post(f"{server.url}/generate", json={"prompt": "now it works"})
    finally:
        fake.pulled.set()

    assert pulling.status_code == 503
    body = pulling.json()
    assert (body["status"], body["reason"]) == ("pulling", "pulling")
    assert (body["completed"], body["total"]) == (318_500_000, 637_000_000)
    assert body["message"] == f"pulling {MODEL}: 50% of 637 MB (MINIVAULT_AUTO_PULL)"
    assert body["backend"]["model_available"] is False
    refusal = f"pulling {MODEL}: 50% of 637 MB; retry when /ready says ready"
    for response in (rest, sse):
        assert response.status_code == 503
        assert response.json()["error"] == {"code": "model_loading", "message": refusal,
                                            "id": response.headers["x-request-id"]}  # fmt: skip
    assert [frame["type"] for frame in frames] == ["start", "error"]
    assert (frames[1]["code"], frames[1]["message"]) == ("model_loading", refusal)
    assert (ready.json()["status"], ready.json()["backend"]["model_available"]) == ("ready", True)
    assert (after.status_code, after.json()["response"]) == (200, "now it works")
    assert fake.pulls == 1
    logged = [(line["endpoint"], line["status"], (line["error"] or {}).get("code")) for line in read_log(log_path)]
    assert logged == [
        ("rest", "error", "model_loading"), ("sse", "error", "model_loading"), ("ws", "error", "model_loading"),
        ("rest", "ok", None),
    ]  # fmt: skip
    layer = [f"auto-pull: {MODEL} layer 2af3b81862c6: {p}% of 637 MB" for p in (0, 25, 50, 100)]
    small = [f"auto-pull: {MODEL} layer af0ddbdaaa26: {p}% of 1 kB" for p in (0, 25, 50, 100)]
    assert bootstrap_lines(output) == [
        f"auto-pull: {MODEL} is not in Ollama; pulling it (try 1)",
        f"auto-pull: {MODEL}: pulling manifest",
        *layer,
        *small,
        f"auto-pull: {MODEL}: verifying sha256 digest",
        f"auto-pull: {MODEL}: writing manifest",
        f"auto-pull: {MODEL} pulled (637 MB)",
    ]


def test_failed_pull_is_reported_retried_with_backoff_and_prompts_get_the_upstream_error(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, output: pytest.LogCaptureFixture
) -> None:
    with gateway(fake_server.url, log_path, ollama_model="no-such-model") as (server, _):
        fake.wait_until(lambda f: f.pulls >= 3)
        failed = httpx.get(f"{server.url}/ready")
        generated = httpx.post(f"{server.url}/generate", json={"prompt": "anyone there?"})

    assert failed.status_code == 503
    assert (failed.json()["status"], failed.json()["reason"]) == ("unavailable", "pull_failed")
    cause = "Ollama's registry has no model 'no-such-model' (pull model manifest: file does not exist)"
    assert re.fullmatch(
        rf"pulling no-such-model into Ollama failed: {re.escape(cause)}; next try in [0-9.]+ s",
        failed.json()["message"],
    )
    assert "completed" not in failed.json()
    assert generated.status_code == 404
    assert generated.json()["error"]["code"] == "model_not_found"
    errors = bootstrap_lines(output, logging.ERROR)
    assert errors[:2] == [
        f"auto-pull: pulling no-such-model into Ollama failed: {cause}; next try in 0.05 s",
        f"auto-pull: pulling no-such-model into Ollama failed: {cause}; next try in 0.1 s",
    ]


def test_pull_that_fails_once_succeeds_on_retry(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, output: pytest.LogCaptureFixture
) -> None:
    fake.models.remove(MODEL)
    fake.fail_pulls = 1
    with gateway(fake_server.url, log_path) as (server, _):
        ready = poll_ready(server, lambda r: r.status_code == 200)
        generated = httpx.post(f"{server.url}/generate", json={"prompt": "second time lucky"})

    assert ready.json()["status"] == "ready"
    assert (generated.status_code, generated.json()["response"]) == (200, "second time lucky")
    assert fake.pulls == 2
    assert bootstrap_lines(output, logging.ERROR) == [
        f"auto-pull: pulling {MODEL} into Ollama failed: Ollama: pull model manifest: "
        'Get "https://registry.ollama.ai/v2/": dial tcp: i/o timeout; next try in 0.05 s'
    ]


def test_ollama_that_answers_late_is_checked_again_until_the_model_can_be_pulled(
    log_path: Path, output: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bootstrap, "RETRY_CAP", 0.2)
    ollama = FakeOllamaProcess(port=free_port())
    try:
        with gateway(ollama.url, log_path, ollama_model="phi3:mini") as (server, _):
            down = poll_ready(server, lambda r: "checking again" in " ".join(bootstrap_lines(output)))
            ollama.start()
            ready = poll_ready(server, lambda r: r.status_code == 200)
    finally:
        ollama.stop()

    assert (down.status_code, down.json()["backend"]["reachable"]) == (503, False)
    assert ready.json()["backend"]["model"] == "phi3:mini"
    warnings = bootstrap_lines(output, logging.WARNING)
    # The exception's name depends on the transport (aiohttp reports a refused connection as a timeout).
    assert re.fullmatch(rf"auto-pull: Ollama is not answering at {ollama.url} \(\w+\); checking again in 0.05 s",
                        warnings[0])  # fmt: skip
    assert "auto-pull: phi3:mini pulled (637 MB)" in bootstrap_lines(output)


def test_warmup_runs_after_the_pull(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, output: pytest.LogCaptureFixture
) -> None:
    fake.models.remove(MODEL)
    fake.loaded.clear()
    try:
        with gateway(fake_server.url, log_path, warmup=True) as (server, _):
            loading = poll_ready(server, lambda r: r.json().get("reason") == "loading")
            fake.loaded.set()
            ready = poll_ready(server, lambda r: r.status_code == 200)
    finally:
        fake.loaded.set()

    # The fake answers 404 to a load of a model it lacks: a load counted means the pull came first.
    assert loading.json()["message"] == f"loading {MODEL} upstream (MINIVAULT_WARMUP)"
    assert (fake.pulls, fake.loads, fake.requests) == (1, 1, [{"model": MODEL}])
    assert ready.json()["status"] == "ready"


def test_model_already_present_is_not_pulled(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, output: pytest.LogCaptureFixture
) -> None:
    with gateway(fake_server.url, log_path) as (server, app):
        wait_for_phase(app, "done")
        ready = httpx.get(f"{server.url}/ready")

    assert ready.status_code == 200
    assert fake.pulls == 0
    assert bootstrap_lines(output) == [f"auto-pull: {MODEL} is already in Ollama; nothing to pull"]


def test_auto_pull_off_pulls_nothing(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, output: pytest.LogCaptureFixture
) -> None:
    fake.models.remove(MODEL)
    with gateway(fake_server.url, log_path, auto_pull=False) as (server, app):
        ready = httpx.get(f"{server.url}/ready")
        generated = httpx.post(f"{server.url}/generate", json={"prompt": "hi"})

    assert app.state.bootstrap is None
    assert ready.status_code == 503
    assert ready.json()["reason"] == f"model '{MODEL}' is not pulled; run `ollama pull {MODEL}`"
    assert generated.json()["error"]["code"] == "model_not_found"
    assert fake.pulls == 0
    assert bootstrap_lines(output) == []


def test_other_backends_ignore_auto_pull_with_one_line(log_path: Path, output: pytest.LogCaptureFixture) -> None:
    settings = make_settings(backend="openai", openai_base_url=closed_port_url(), openai_model="m",
                             log_path=log_path, db_path=log_path.with_name("minivault.db"), auto_pull=True)  # fmt: skip
    app = create_app(settings)
    with serve_in_thread(app):
        pass

    assert app.state.bootstrap is None
    assert bootstrap_lines(output) == [
        "MINIVAULT_AUTO_PULL is ignored: the openai backend cannot pull models (only Ollama can)"
    ]


class Hold:
    """A point in a stub pull where it stops until the test releases it."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()


class StubOllama:
    """Just enough of a pulling backend to drive ModelBootstrap without HTTP: each pull plays one script
    of progress events, Holds and a final exception, if any."""

    name = "ollama"
    url = "http://stub"
    default_model = "big:7b"

    def __init__(self, statuses: list[BackendStatus], pulls: list[list[dict[str, Any] | Hold | Exception]]) -> None:
        self.statuses = statuses
        self.pulls = pulls
        self.probes = 0

    async def probe(self, seconds: float) -> BackendStatus:
        self.probes += 1
        return self.statuses.pop(0)

    async def pull(self, model: str) -> AsyncGenerator[dict[str, Any], None]:
        for item in self.pulls.pop(0):
            if isinstance(item, Hold):
                item.reached.set()
                await item.release.wait()
            elif isinstance(item, Exception):
                raise item
            else:
                yield item


def layer_event(completed: int, total: int = 2_000_000_000) -> dict[str, Any]:
    return {"status": "pulling 0123456789ab", "digest": "sha256:0123456789abcdef", "total": total,
            "completed": completed}  # fmt: skip


MISSING = BackendStatus(True, False)


@pytest.mark.anyio
async def test_progress_is_logged_per_tenth_not_per_event_and_waits_back_off_to_the_cap(
    output: pytest.LogCaptureFixture,
) -> None:
    down = BackendStatus(False, False, "Ollama is not answering at http://stub (ConnectError)")
    layer = [layer_event(done) for done in range(0, 2_000_000_001, 2_000_000)]
    pull = [{"status": "pulling manifest"}, *layer, {"status": "success"}]
    stub = StubOllama([down, down, down, down, MISSING], [pull])
    configure_server_log("text")  # as create_app does: MiniVault's lines reach the root logger, and caplog
    pulled = 0

    def count() -> None:
        nonlocal pulled
        pulled += 1

    boot = ModelBootstrap(stub, 1.0, retry_base=0.01, retry_cap=0.04, on_pulled=count)  # type: ignore[arg-type]
    await asyncio.wait_for(boot.run(), 10)

    assert (boot.phase, boot.completed, boot.total, stub.probes, pulled) == ("done", 2_000_000_000, 2_000_000_000, 5, 1)
    assert boot.refusal(boot.model) is None and boot.readiness() is None
    lines = bootstrap_lines(output)
    assert [line.rsplit(" in ", 1)[1] for line in lines[:4]] == ["0.01 s", "0.02 s", "0.04 s", "0.04 s"]
    assert lines[4:] == [
        "auto-pull: big:7b is not in Ollama; pulling it (try 1)",
        "auto-pull: big:7b: pulling manifest",
        *[f"auto-pull: big:7b layer 0123456789ab: {tenth * 10}% of 2.0 GB" for tenth in range(11)],
        "auto-pull: big:7b pulled (2.0 GB)",
    ]
    assert len(layer) == 1001


@pytest.mark.anyio
async def test_broken_pull_stays_reported_as_failed_until_its_retry_downloads_again(
    output: pytest.LogCaptureFixture,
) -> None:
    configure_server_log("text")
    broken = BackendError("the connection to Ollama at http://stub broke: Server disconnected")
    before_layers, mid_layer = Hold(), Hold()
    stub = StubOllama(
        [MISSING, MISSING],
        [
            [{"status": "pulling manifest"}, layer_event(500_000_000), broken],
            [
                {"status": "pulling manifest"},
                before_layers,
                layer_event(900_000_000),
                mid_layer,
                layer_event(2_000_000_000),
                {"status": "success"},
            ],
        ],  # fmt: skip
    )
    boot = ModelBootstrap(stub, 1.0, retry_base=0.01)  # type: ignore[arg-type]
    run = asyncio.create_task(boot.run())
    try:
        await asyncio.wait_for(before_layers.reached.wait(), 10)
        failed = (boot.phase, boot.readiness(), boot.refusal(boot.model))
        before_layers.release.set()
        await asyncio.wait_for(mid_layer.reached.wait(), 10)
        pulling, refusal = boot.readiness(), boot.refusal(boot.model)
        mid_layer.release.set()
        await asyncio.wait_for(run, 10)
    finally:
        run.cancel()

    error = f"pulling big:7b into Ollama failed: {broken.message}; next try in 0.01 s"
    assert failed == ("failed", {"status": "unavailable", "reason": "pull_failed", "message": error}, None)
    assert pulling == {"status": "pulling", "reason": "pulling", "completed": 900_000_000, "total": 2_000_000_000,
                       "message": "pulling big:7b: 45% of 2.0 GB (MINIVAULT_AUTO_PULL)"}  # fmt: skip
    assert isinstance(refusal, ModelLoading)
    assert (refusal.status, refusal.code) == (503, "model_loading")
    assert refusal.message == "pulling big:7b: 45% of 2.0 GB; retry when /ready says ready"
    assert (boot.phase, boot.error, stub.probes) == ("done", None, 2)
    assert bootstrap_lines(output, logging.ERROR) == [f"auto-pull: {error}"]
