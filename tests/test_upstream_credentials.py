"""`user:password@` in OLLAMA_BASE_URL(S) and OPENAI_BASE_URL(S): sent to the upstream as HTTP basic auth, over
either transport, and shown redacted wherever MiniVault prints the URL. The upstreams are fakes behind a recording
basic-auth gate on loopback."""

import asyncio
import base64
import logging
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send
from typer.testing import CliRunner

from app.backends import HostPool, OllamaBackend, open_backend
from app.backends.base import split_credentials
from app.cli import cli
from app.config import ConfigError, load_settings, redact_url
from app.main import create_app
from app.routes.health import public_text
from tests.conftest import closed_port_url, make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

USER, PASSWORD = "vault", "Zx9-pa@55"  # the `@` travels percent-encoded in the URL
USERINFO = f"{USER}:Zx9-pa%4055"
TOKEN = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
KEY = "credentials-test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
# What must never be printed: the password, as typed in the URL and decoded, and the header that carries it.
SECRETS = ("Zx9-pa", "pa%4055", "pa@55", TOKEN)


class BasicAuthGate:
    """In front of a fake upstream: records each request's Authorization header, answers 401 without the right one."""

    def __init__(self, app: ASGIApp, password: str = PASSWORD) -> None:
        self.app = app
        self.expected = "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()
        self.seen: list[str | None] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization")
        self.seen.append(header.decode() if header is not None else None)
        if self.seen[-1] == self.expected:
            await self.app(scope, receive, send)
            return
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b'Basic realm="llm"')]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"error": "unauthorized"}'})


class FakeOpenAI:
    """A minimal OpenAI-compatible server: one model, and a chat answer that echoes the prompt in one delta."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        if scope["path"] == "/v1/models":
            body, kind = (
                orjson.dumps({"object": "list", "data": [{"id": "echo", "object": "model"}]}),
                b"application/json",
            )
        else:
            request = b""
            while (message := await receive())["type"] == "http.request":
                request += message.get("body", b"")
                if not message.get("more_body"):
                    break
            prompt = orjson.loads(request)["messages"][-1]["content"]
            events = [{"choices": [{"index": 0, "delta": {"content": prompt}, "finish_reason": "stop"}]}]
            body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
            kind = b"text/event-stream"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})


def with_userinfo(url: str, userinfo: str = USERINFO) -> str:
    return url.replace("http://", f"http://{userinfo}@", 1)


@dataclass
class Setup:
    server: RunningServer
    gates: list[BasicAuthGate]
    upstreams: list[RunningServer]
    log_path: Path


@contextmanager
def gated(kind: str, transport: str, log_path: Path) -> Iterator[Setup]:
    """MiniVault with API keys, over one or two gated upstreams whose URLs carry the credentials."""
    hosts = 2 if kind.endswith("pool") else 1
    gates = [BasicAuthGate(FakeOpenAI() if kind.startswith("openai") else FakeOllama()) for _ in range(hosts)]
    with ExitStack() as stack:
        upstreams = [stack.enter_context(serve_in_thread(gate, lifespan="off")) for gate in gates]
        urls = [with_userinfo(upstream.url) for upstream in upstreams]
        common: dict[str, Any] = {"log_path": log_path, "api_keys": KEY, "upstream_transport": transport}
        if kind == "ollama":
            settings = make_settings(backend="ollama", ollama_base_url=urls[0], **common)
        elif kind == "ollama-pool":
            settings = make_settings(backend="ollama", ollama_base_urls=",".join(urls), **common)
        elif kind == "openai":
            settings = make_settings(backend="openai", openai_base_url=urls[0], **common)
        else:
            settings = make_settings(backend="openai", openai_base_urls=",".join(urls), openai_model="echo", **common)
        server = stack.enter_context(serve_in_thread(create_app(settings)))
        yield Setup(server, gates, upstreams, log_path)


CASES = [("ollama", "aiohttp"), ("ollama", "httpx"), ("ollama-pool", "aiohttp"), ("openai", "aiohttp"),
         ("openai", "httpx"), ("openai-pool", "aiohttp")]  # fmt: skip


@pytest.mark.parametrize(("kind", "transport"), CASES, ids=[f"{k}-{t}" for k, t in CASES])
def test_credentials_go_as_basic_auth_and_are_printed_nowhere(
    kind: str, transport: str, log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    model = "echo" if kind.startswith("openai") else "tinyllama:1.1b-chat"
    with gated(kind, transport, log_path) as setup:
        url = setup.server.url
        answers = [
            httpx.post(f"{url}/generate", json={"prompt": f"p{i} ", "model": model}, headers=AUTH, timeout=10)
            for i in range(4)
        ]
        streamed = httpx.post(f"{url}/generate", json={"prompt": "s ", "model": model, "stream": True},
                              headers=AUTH, timeout=10)  # fmt: skip
        version = httpx.get(f"{url}/api/version", headers=AUTH) if kind == "ollama" else None
        health, ready = httpx.get(f"{url}/health"), httpx.get(f"{url}/ready")
        models, metrics = httpx.get(f"{url}/models", headers=AUTH), httpx.get(f"{url}/metrics", headers=AUTH)
        shown = CliRunner().invoke(cli, ["health", "--url", url])
        seen = [header for gate in setup.gates for header in gate.seen]

    assert [(a.status_code, a.json()["response"]) for a in answers] == [(200, f"p{i} ") for i in range(4)]
    assert streamed.status_code == 200 and "s " in streamed.text
    if version is not None:  # a passed-through request carries them too
        assert version.status_code == 200
    assert (health.status_code, ready.status_code, models.status_code, metrics.status_code) == (200, 200, 200, 200)
    # Every request the upstreams saw carried the credentials, as basic auth (the gate refused none).
    assert seen and set(seen) == {f"Basic {TOKEN}"}
    log_text = setup.log_path.read_text()
    assert len(read_log(setup.log_path)) == 5
    printed = {"/health": health.text, "/ready": ready.text, "/models": models.text, "/metrics": metrics.text,
               "log file": log_text, "server log": caplog.text, "minivault health": shown.stdout}  # fmt: skip
    for where, text in printed.items():
        for secret in SECRETS:
            assert secret not in text, f"{where} shows {secret!r}"
    if kind.endswith("pool"):
        # Authenticated views name each host by its URL with the password redacted (open ones by its label).
        redacted = [redact_url(with_userinfo(u.url)) for u in setup.upstreams]
        assert all(f'host="{host}"' in metrics.text for host in redacted)
        assert {line["upstream"] for line in read_log(setup.log_path)} <= set(redacted)
        assert [h["host"] for h in health.json()["hosts"]] == ["host-1", "host-2"]
        listed = "".join(f"  {h['host']}: ok, {len(h['models'])} models, 0 in flight\n" for h in health.json()["hosts"])
        assert listed in shown.stdout
    assert shown.exit_code == 0
    assert shown.stdout.splitlines()[1] == f"backend {kind.removesuffix('-pool')}: reachable"
    assert f"{USER}:***@" not in health.text + ready.text  # no URL at all on the open endpoints


def test_a_wrong_password_is_a_502_that_says_so_and_shows_no_password(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = BasicAuthGate(FakeOllama(), password="the-right-one")
    with serve_in_thread(gate, lifespan="off") as upstream:
        settings = make_settings(ollama_base_url=with_userinfo(upstream.url), log_path=log_path, api_keys=KEY)
        with serve_in_thread(create_app(settings)) as server:
            answer = httpx.post(f"{server.url}/generate", json={"prompt": "hi"}, headers=AUTH)
            ready = httpx.get(f"{server.url}/ready")

    assert (answer.status_code, answer.json()["error"]["code"]) == (502, "backend_error")
    assert answer.json()["error"]["message"] == (
        "Ollama refused the credentials (401: unauthorized); put the proxy's user:password@ in OLLAMA_BASE_URL"
    )
    assert ready.status_code == 503
    assert ready.json()["reason"] == "Ollama is not answering at OLLAMA_BASE_URL (HTTPStatusError)"
    for text in (answer.text, ready.text, log_path.read_text(), caplog.text):
        for secret in SECRETS:
            assert secret not in text


def test_an_unreachable_upstream_is_named_with_its_password_redacted(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = with_userinfo(closed_port_url())
    settings = make_settings(ollama_base_url=url, log_path=log_path, api_keys=KEY)
    with serve_in_thread(create_app(settings)) as server:
        answer = httpx.post(f"{server.url}/generate", json={"prompt": "hi"}, headers=AUTH)
        ready = httpx.get(f"{server.url}/ready")

    assert (answer.status_code, answer.json()["error"]["code"]) == (503, "backend_unavailable")
    assert answer.json()["error"]["message"].startswith(f"cannot reach Ollama at {redact_url(url)}: start it")
    assert redact_url(url) == url.replace("Zx9-pa%4055", "***")
    assert ready.json()["reason"].startswith("Ollama is not answering at OLLAMA_BASE_URL (")
    for text in (answer.text, ready.text, log_path.read_text(), caplog.text):
        for secret in SECRETS:
            assert secret not in text


def test_auto_choice_probes_with_the_credentials_and_logs_the_url_redacted(
    log_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    gate = BasicAuthGate(FakeOllama())
    with serve_in_thread(gate, lifespan="off") as upstream:
        url = with_userinfo(upstream.url)
        settings = make_settings(backend="auto", ollama_base_url=url, log_path=log_path)
        with serve_in_thread(create_app(settings)) as server:
            health = httpx.get(f"{server.url}/health").json()

    assert health["backend"]["name"] == "ollama"
    assert gate.seen[0] == f"Basic {TOKEN}"  # /api/version, the auto choice's probe
    assert f"Ollama answers at {redact_url(url)}; serving with it" in caplog.text
    for secret in SECRETS:
        assert secret not in caplog.text


def test_a_bad_url_setting_is_reported_with_its_password_redacted() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(_env_file=None, ollama_base_url=f"ftp://{USERINFO}@gpu1:11434")

    assert str(raised.value) == (
        "invalid setting OLLAMA_BASE_URL='ftp://vault:***@gpu1:11434': must be an http:// or https:// URL with a "
        "host, like http://localhost:11434"
    )


def test_credentials_in_the_url_and_openai_api_key_together_stop_start_up(log_path: Path) -> None:
    settings = make_settings(
        backend="openai", openai_base_url=f"http://{USERINFO}@127.0.0.1:9", openai_api_key="sk-x", log_path=log_path
    )

    async def open_it() -> None:
        async with AsyncExitStack() as stack:
            await open_backend(settings, stack)

    with pytest.raises(RuntimeError) as raised:
        asyncio.run(open_it())
    assert str(raised.value) == (
        "OPENAI_BASE_URL=http://vault:***@127.0.0.1:9 carries user:password@ and OPENAI_API_KEY is set: a request "
        "has one Authorization header, so keep only one of them"
    )


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://u:p@h:1", "http://u:***@h:1"),
        ("https://u:p%40x@h/base", "https://u:***@h/base"),
        ("http://token@h", "http://***@h"),  # a lone user name is often a token
        ("http://h:1", "http://h:1"),
        ("cannot reach Ollama at http://u:pw@h:1: start it", "cannot reach Ollama at http://u:***@h:1: start it"),
        ("http://a:b@h1,http://c:d@h2", "http://a:***@h1,http://c:***@h2"),
        ("mail me at a@b.example, see http://h/x@y", "mail me at a@b.example, see http://h/x@y"),
    ],
)
def test_redact_url(text: str, shown: str) -> None:
    assert redact_url(text) == shown


def test_split_credentials_moves_them_to_a_basic_auth_header() -> None:
    assert split_credentials(f"http://{USERINFO}@gpu1:11434") == (
        "http://gpu1:11434", {"Authorization": f"Basic {TOKEN}"}
    )  # fmt: skip
    assert split_credentials("http://gpu1:11434") == ("http://gpu1:11434", {})


def test_open_endpoints_name_the_setting_or_the_host_label_instead_of_a_url() -> None:
    client = httpx.AsyncClient()
    one = OllamaBackend(client, "http://vault:***@gpu1:11434", "m")
    assert public_text("cannot reach Ollama at http://vault:***@gpu1:11434: start it", one) == (
        "cannot reach Ollama at OLLAMA_BASE_URL: start it"
    )  # fmt: skip
    assert public_text("Cannot connect to host gpu1:11434 ssl:default", one) == (
        "Cannot connect to host OLLAMA_BASE_URL ssl:default"
    )  # fmt: skip
    assert public_text("a token at http://t:secret@elsewhere", one) == "a token at http://t:***@elsewhere"
    # One URL the prefix of another: each is replaced whole.
    pool = HostPool([OllamaBackend(client, "http://gpu1:1", "m"), OllamaBackend(client, "http://gpu1:11", "m")],
                    default_model="m", limit=4)  # fmt: skip
    assert public_text("http://gpu1:11: down; http://gpu1:1: down; host gpu1:11 refused", pool) == (
        "host-2: down; host-1: down; host host-2 refused"
    )  # fmt: skip
