"""The embedded llama.cpp server is inside MiniVault's wall: its loopback port answers only MiniVault's client
(a per-process key), no web page may read it, and the open /health and /ready name neither its URL, nor the
model's path, nor a key. Against the real engine and the bundled SmolLM2-135M."""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.backends.embedded import EmbeddedBackend, bundled_model_path
from app.main import create_app
from tests.conftest import make_settings, read_log
from tests.support.dialect_servers import Gateway, wait_started
from tests.support.servers import serve_in_thread

USER_KEY = "wall-user-key-0123456789"
AUTH = {"Authorization": f"Bearer {USER_KEY}"}
CHAT = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
EVIL = "http://evil.example"


@contextmanager
def walled_gateway(log_path: Path) -> Iterator[Gateway]:
    """MiniVault over the embedded engine, with MINIVAULT_API_KEYS set."""
    settings = make_settings(
        backend="embedded", embedded_context=512, embedded_threads=1, log_path=log_path, api_keys=USER_KEY
    )
    app = create_app(settings)
    with serve_in_thread(app) as server:
        yield Gateway(wait_started(server), app, log_path, None)


@pytest.fixture(scope="module")
def walled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with walled_gateway(tmp_path_factory.mktemp("wall") / "log.jsonl") as gateway:
        yield gateway


def engine_of(gateway: Gateway) -> EmbeddedBackend:
    backend = gateway.app.state.backend
    assert isinstance(backend, EmbeddedBackend)
    return backend


def secrets_of(gateway: Gateway) -> list[str]:
    """What no open endpoint may show: the engine's address and port, its key, the model's path, the user's key."""
    backend = engine_of(gateway)
    address = backend.engine.address
    path = backend.engine.model_path
    return [address, address.removeprefix("http://"), backend.engine.api_key, str(path), str(path.parent), USER_KEY]


def test_the_engine_port_refuses_a_request_without_its_key(walled: Gateway) -> None:
    address = engine_of(walled).engine.address
    log_before = len(read_log(walled.log_path))
    with httpx.Client(base_url=address, timeout=10) as direct:
        keyless_chat = direct.post("/v1/chat/completions", json=CHAT)
        keyless_models = direct.get("/v1/models")
        keyless_slots = direct.get("/slots")
        # A MiniVault key is not the engine's: only MiniVault's own client holds that one.
        user_key_chat = direct.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        guessed = direct.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer guess"})
        x_api_key = direct.post("/v1/chat/completions", json=CHAT, headers={"X-Api-Key": USER_KEY})

    for response in (keyless_chat, keyless_models, keyless_slots, user_key_chat, guessed, x_api_key):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert len(read_log(walled.log_path)) == log_before  # nothing answered outside MiniVault


def test_no_other_origin_may_read_the_engine(walled: Gateway) -> None:
    address = engine_of(walled).engine.address
    with httpx.Client(base_url=address, timeout=10) as direct:
        post = direct.post("/v1/chat/completions", json=CHAT, headers={"Origin": EVIL})
        preflight = direct.options(
            "/v1/chat/completions",
            headers={"Origin": EVIL, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"},
        )  # fmt: skip

    assert post.status_code == 401
    for response in (post, preflight):
        # llama.cpp's default echoes any origin (or sends *); allowing none leaves the header empty or absent.
        assert response.headers.get("access-control-allow-origin", "") == ""
        assert response.headers.get("access-control-allow-credentials") != "true"


def test_minivault_prompts_still_reach_the_engine(walled: Gateway) -> None:
    keyless = httpx.post(f"{walled.url}/generate", json={"prompt": "Say hi."}, timeout=60)
    answered = httpx.post(
        f"{walled.url}/generate", json={"prompt": "Say hi.", "options": {"num_predict": 4}}, headers=AUTH, timeout=60
    )
    chat = httpx.post(
        f"{walled.url}/v1/chat/completions",
        json={"model": engine_of(walled).default_model, "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 4},
        headers=AUTH, timeout=60,
    )  # fmt: skip

    assert (keyless.status_code, keyless.json()["error"]["code"]) == (401, "unauthorized")
    assert answered.status_code == 200, answered.text
    assert answered.json()["response"].strip()
    assert 0 < answered.json()["usage"]["completion_tokens"] <= 4
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"].strip()


def test_open_health_and_ready_name_the_backend_but_no_url_path_or_key(walled: Gateway) -> None:
    health = httpx.get(f"{walled.url}/health")
    ready = httpx.get(f"{walled.url}/ready")
    model = engine_of(walled).default_model

    assert (health.status_code, ready.status_code) == (200, 200)
    for response in (health, ready):
        assert response.json()["backend"] == {
            "name": "embedded", "model": model, "reachable": True, "model_available": True
        }  # fmt: skip
        for secret in secrets_of(walled):
            assert secret not in response.text
        assert not re.search(r"127\.0\.0\.1:\d+|https?://", response.text)


def test_models_names_the_model_file_not_its_path(walled: Gateway) -> None:
    path = bundled_model_path()
    assert path is not None
    listed = httpx.get(f"{walled.url}/models", headers=AUTH)
    tags = httpx.get(f"{walled.url}/api/tags", headers=AUTH)
    shown = httpx.post(f"{walled.url}/api/show", json={"model": engine_of(walled).default_model}, headers=AUTH)

    assert listed.status_code == tags.status_code == shown.status_code == 200
    (model,) = listed.json()["models"]
    assert (model["name"], model["size"], model["details"]) == (
        path.name.removesuffix(".gguf"), path.stat().st_size, {"file": path.name}
    )  # fmt: skip
    assert shown.json()["details"]["file"] == path.name
    for response in (listed, tags, shown):
        assert str(path.parent) not in response.text


def test_ready_names_no_url_once_the_engine_is_gone(tmp_path: Path) -> None:
    with walled_gateway(tmp_path / "log.jsonl") as gateway:
        engine = engine_of(gateway).engine
        secrets = secrets_of(gateway)
        engine.stop()  # the in-process server goes away; MiniVault's lifespan stops it again harmlessly
        ready = httpx.get(f"{gateway.url}/ready")
        health = httpx.get(f"{gateway.url}/health")
        prompt = httpx.post(f"{gateway.url}/generate", json={"prompt": "hi"}, headers=AUTH, timeout=30)

    assert ready.status_code == 503
    assert re.fullmatch(r"the embedded engine is not answering at its loopback port \(\w+\)", ready.json()["reason"])
    assert health.json()["backend"]["reachable"] is False
    for response in (ready, health):
        for secret in secrets:
            assert secret not in response.text
    # An authenticated caller is told what broke; the engine's key is still nowhere.
    assert prompt.status_code in (502, 503)
    error = prompt.json()["error"]
    assert error["code"] == {502: "backend_error", 503: "backend_unavailable"}[prompt.status_code]
    assert "embedded" in error["message"] or "llama" in error["message"]
    assert engine.api_key not in prompt.text
