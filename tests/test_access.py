"""Who may call MiniVault and what they may send: API keys on every route and transport, the key kept
out of every log, start-up warnings, CORS, the body limit, and what the interaction log keeps."""

import hashlib
import json
import logging
import os
import re
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import iter_route_contexts
from starlette.routing import Mount, Route, WebSocketRoute
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.main import create_app
from tests.conftest import make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

pytestmark = pytest.mark.anyio

K2_DIGEST = hashlib.sha256(b"k2").hexdigest()
KEYS = f"k1,sha256:{K2_DIGEST}"
# Probes, and the pages a browser loads before it can send a key (they hold no data).
OPEN = {"/health", "/ready", "/", "/docs", "/redoc", "/openapi.json", "/docs-assets/redoc.standalone.js"}
OPEN_MOUNTS = {"/static": "/static/index.html", "/docs-assets": "/docs-assets/swagger-ui-bundle.js"}
# Long and unlike anything else the server prints, so finding it in output means it leaked.
SECRET = "mv-secret-key-Qz7uXw"
WRONG_SECRET = "mv-wrong-key-Jy4pTb"


def raw_log(path: Path) -> bytes:
    return path.read_bytes()


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


@contextmanager
def served(fake_server: RunningServer, log_path: Path, **overrides: Any) -> Iterator[RunningServer]:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, **overrides)
    with serve_in_thread(create_app(settings)) as server:
        yield server


@contextmanager
def uvicorn_logs_at_info() -> Iterator[None]:
    """uvicorn's default level (what `minivault serve` runs with): connection and access lines are printed."""
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn.access")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await ws.recv(decode=True))


async def frames_until_end(ws: ClientConnection) -> list[dict[str, Any]]:
    frames = [await recv(ws)]
    while frames[-1]["type"] not in ("done", "error"):
        frames.append(await recv(ws))
    return frames


async def error_then_close(ws: ClientConnection) -> tuple[dict[str, Any], int | None, str | None]:
    """The frame a refused or ended websocket gets, then its close code and reason."""
    frame = await recv(ws)
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    return frame, ws.close_code, ws.close_reason


def assert_unauthorized(response: httpx.Response, method: str) -> None:
    assert response.status_code == 401, (method, response.url, response.text)
    assert response.headers["www-authenticate"] == 'Bearer realm="minivault"'
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32
    if method == "HEAD":
        assert response.content == b""
        return
    error = response.json()["error"]
    path = response.url.path
    if path.startswith("/api/"):  # Ollama's shape: the message alone
        assert isinstance(error, str) and "Authorization: Bearer" in error
        return
    if path.startswith("/v1/"):  # OpenAI's shape
        assert (error["code"], error["type"], error["param"]) == ("unauthorized", "authentication_error", None)
    else:
        assert (error["code"], error["id"]) == ("unauthorized", request_id)
    assert "Authorization: Bearer" in error["message"]
    assert "X-API-Key" in error["message"]


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


async def test_every_route_but_probes_and_pages_refuses_a_request_without_a_key(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    app = create_app(make_settings(ollama_base_url=fake_server.url, log_path=log_path, api_keys=KEYS))
    contexts = [c for c in iter_route_contexts(app.routes) if not isinstance(c.original_route, Mount)]
    http_routes = [c for c in contexts if isinstance(c.original_route, Route)]
    ws_routes = [c for c in contexts if isinstance(c.original_route, WebSocketRoute)]
    mounts = {r.path for r in app.routes if isinstance(r, Mount)}
    # A route of another kind, or another mount, needs its own check here before it can ship.
    assert mounts == set(OPEN_MOUNTS)
    assert len(http_routes) + len(ws_routes) == len(contexts)
    all_paths = {c.path for c in contexts}
    checked: set[str] = set()

    with serve_in_thread(app) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            for route in http_routes:
                if route.path in OPEN:
                    continue
                for method in sorted(route.methods or ()):
                    assert_unauthorized(await client.request(method, concrete(route.path)), method)
                checked.add(route.path)
            for path in sorted(OPEN | set(OPEN_MOUNTS.values())):
                assert (await client.get(path)).status_code == 200, path
        for route in ws_routes:
            async with connect(f"{server.ws_url}{concrete(route.path)}") as ws:
                frame, close_code, reason = await error_then_close(ws)
            assert (frame["type"], frame["code"], close_code, reason) == ("error", "unauthorized", 1008, "unauthorized")
            assert "X-API-Key" in frame["message"]
            checked.add(route.path)

    assert checked == all_paths - OPEN
    assert checked >= {"/generate", "/ws/generate", "/models", "/models/pull", "/metrics", "/history"}
    assert (fake.requests, fake.started) == ([], 0)
    assert read_log(log_path) == []


async def test_bearer_header_api_key_header_and_digest_configured_key_are_accepted(
    fake_server: RunningServer, log_path: Path
) -> None:
    accepted = [
        ({"Authorization": "Bearer k1"}, "k1"),
        ({"X-API-Key": "k1"}, "k1"),
        ({"Authorization": "Bearer k2"}, "k2"),
        ({"X-API-Key": "k2"}, "k2"),
    ]
    refused = [
        {"Authorization": "Bearer nope"},
        {"X-API-Key": "nope"},
        {"X-API-Key": f"sha256:{K2_DIGEST}"},  # the digest itself is not a key
    ]
    with served(fake_server, log_path, api_keys=KEYS) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            ids = {}
            for headers, key in accepted:
                response = await client.post("/generate", json={"prompt": "let me in"}, headers=headers)
                assert response.status_code == 200, headers
                assert response.json()["response"] == "let me in"
                ids[response.headers["x-request-id"]] = key_id(key)
            for headers in refused:
                response = await client.post("/generate", json={"prompt": "let me in"}, headers=headers)
                assert_unauthorized(response, "POST")
                assert "not valid" in response.json()["error"]["message"]

    assert {line["id"]: line["key_id"] for line in read_log(log_path)} == ids


async def test_websocket_needs_a_key_and_takes_it_from_the_query_or_either_header(
    fake_server: RunningServer, log_path: Path
) -> None:
    with served(fake_server, log_path, api_keys=KEYS) as server:
        url = f"{server.ws_url}/ws/generate"
        async with connect(url) as ws:
            missing = await error_then_close(ws)
        async with connect(f"{url}?api_key=wrong") as ws:
            wrong = await error_then_close(ws)
        answers = []
        for target, headers in [
            (f"{url}?api_key=k1", {}),
            (url, {"X-API-Key": "k1"}),
            (url, {"Authorization": "Bearer k2"}),
        ]:
            async with connect(target, additional_headers=headers) as ws:
                await ws.send(json.dumps({"prompt": "open sesame"}))
                answers.append(await frames_until_end(ws))

    frame, close_code, reason = missing
    assert (frame["type"], frame["code"], close_code, reason) == ("error", "unauthorized", 1008, "unauthorized")
    assert "api_key" in frame["message"]
    frame, close_code, _ = wrong
    assert (frame["code"], close_code) == ("unauthorized", 1008)
    assert "not valid" in frame["message"]
    for frames in answers:
        assert [f["type"] for f in frames] == ["start", "token", "token", "done"]
        assert frames[-1]["response"] == "open sesame"
    lines = {line["id"]: line["key_id"] for line in read_log(log_path)}
    assert lines == {
        answers[0][0]["id"]: key_id("k1"),
        answers[1][0]["id"]: key_id("k1"),
        answers[2][0]["id"]: key_id("k2"),
    }


async def test_key_never_reaches_the_log_or_server_output_and_metrics_need_it(
    fake_server: RunningServer, log_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="app")
    with served(fake_server, log_path, api_keys=SECRET) as server, uvicorn_logs_at_info():
        async with httpx.AsyncClient(base_url=server.url) as client:
            for headers in ({"Authorization": f"Bearer {SECRET}"}, {"X-API-Key": SECRET}):
                assert (await client.post("/generate", json={"prompt": "a"}, headers=headers)).status_code == 200
            sse = await client.post("/generate", json={"prompt": "c", "stream": True}, headers={"X-API-Key": SECRET})
            assert sse.status_code == 200
            assert "event: done" in sse.text
            refused = await client.post("/generate", json={"prompt": "d"}, headers={"X-API-Key": WRONG_SECRET})
            assert refused.status_code == 401
            assert_unauthorized(await client.get("/metrics"), "GET")
        for query in (f"?api_key={SECRET}", ""):
            headers = {} if query else {"X-API-Key": SECRET}
            async with connect(f"{server.ws_url}/ws/generate{query}", additional_headers=headers) as ws:
                await ws.send(json.dumps({"prompt": "e"}))
                assert (await frames_until_end(ws))[-1]["type"] == "done"
        async with connect(f"{server.ws_url}/ws/generate?api_key={WRONG_SECRET}") as ws:
            assert (await error_then_close(ws))[1] == 1008
        async with httpx.AsyncClient(base_url=server.url) as client:
            metrics = await client.get("/metrics", headers={"X-API-Key": SECRET})

    assert metrics.status_code == 200
    assert 'minivault_refused_requests_total{code="unauthorized"} 3.0' in metrics.text
    lines = read_log(log_path)
    assert [line["key_id"] for line in lines] == [key_id(SECRET)] * 5
    output = capfd.readouterr()
    app_records = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("app", "uvicorn"))
    server_output = output.out + output.err + app_records
    # uvicorn prints each websocket's path and query: the key given there is masked.
    assert '"WebSocket /ws/generate?api_key=***" [accepted]' in server_output
    log_bytes = raw_log(log_path)
    for key in (SECRET, WRONG_SECRET):
        assert key not in server_output
        assert key.encode() not in log_bytes
        assert key not in metrics.text


async def test_key_id_is_null_when_auth_is_off(minivault: RunningServer, log_path: Path) -> None:
    async with httpx.AsyncClient(base_url=minivault.url) as client:
        assert (await client.post("/generate", json={"prompt": "hi"})).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
    async with connect(f"{minivault.ws_url}/ws/generate") as ws:
        await ws.send(json.dumps({"prompt": "hi"}))
        assert (await frames_until_end(ws))[-1]["type"] == "done"
    minivault.stop()

    lines = read_log(log_path)
    assert [(line["endpoint"], line["key_id"]) for line in lines] == [("rest", None), ("ws", None)]


@pytest.mark.parametrize(
    ("argv", "keys", "announced", "warned"),
    [
        ([], None, "auth is off", False),
        (["--host", "0.0.0.0"], None, "auth is off", True),
        (["--host=0.0.0.0"], None, "auth is off", True),
        (["--host", "127.0.0.1"], None, "auth is off", False),
        (["--host", "localhost"], None, "auth is off", False),
        (["--host", "0.0.0.0"], "k1", "auth is on", False),
    ],
)
async def test_start_up_says_whether_auth_is_on_and_warns_when_exposed_without_keys(
    fake_server: RunningServer,
    log_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    keys: str | None,
    announced: str,
    warned: bool,
) -> None:
    monkeypatch.setattr(sys, "argv", ["uvicorn", "app.main:app", *argv])
    monkeypatch.delenv("UVICORN_HOST", raising=False)
    # A JSON-format server log elsewhere in the session turns propagation off; caplog listens at the root.
    monkeypatch.setattr(logging.getLogger("app"), "propagate", True)
    caplog.set_level(logging.INFO, logger="app")
    app = create_app(make_settings(ollama_base_url=fake_server.url, log_path=log_path, api_keys=keys))
    async with app.router.lifespan_context(app):
        pass

    records = [r for r in caplog.records if r.name == "app"]
    assert [r.levelno for r in records if r.getMessage().startswith(announced)] == [logging.INFO]
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    if warned:
        [warning] = warnings
        assert "MINIVAULT_API_KEYS" in warning
        assert "0.0.0.0" in warning
    else:
        assert warnings == []


async def test_cors_is_off_by_default(minivault: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=minivault.url, headers={"Origin": "http://a.test"}) as client:
        simple = await client.get("/health")
        preflight = await client.options(
            "/generate",
            headers={"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
        )

    # With no origins listed, a page of another origin is refused outright (app/web/edge.py).
    assert simple.status_code == 403
    assert simple.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in simple.headers
    assert preflight.status_code == 403
    assert preflight.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in preflight.headers


async def test_cors_answers_preflights_without_a_key_for_listed_origins_only(
    fake_server: RunningServer, log_path: Path
) -> None:
    preflight_headers = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with served(fake_server, log_path, api_keys="k1", cors_origins="http://a.test") as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            allowed = await client.options("/generate", headers={"Origin": "http://a.test", **preflight_headers})
            other = await client.options("/generate", headers={"Origin": "http://b.test", **preflight_headers})
            actual = await client.post(
                "/generate", json={"prompt": "hi"}, headers={"Origin": "http://a.test", "Authorization": "Bearer k1"}
            )
            keyless = await client.post("/generate", json={"prompt": "hi"}, headers={"Origin": "http://a.test"})

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://a.test"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    allowed_headers = {name.strip().lower() for name in allowed.headers["access-control-allow-headers"].split(",")}
    assert allowed_headers >= {"authorization", "content-type"}
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in other.headers
    assert actual.status_code == 200
    assert actual.headers["access-control-allow-origin"] == "http://a.test"
    exposed = {name.strip().lower() for name in actual.headers["access-control-expose-headers"].split(",")}
    assert "x-request-id" in exposed
    # A browser page can read why it was refused.
    assert keyless.status_code == 401
    assert keyless.headers["access-control-allow-origin"] == "http://a.test"


def padded_body(size: int) -> bytes:
    head, tail = b'{"prompt": "', b'"}'
    body = head + b"a" * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    return body


async def test_bodies_over_the_limit_get_413_declared_or_chunked(fake_server: RunningServer, log_path: Path) -> None:
    big = padded_body(2000)

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 500):
            yield big[start : start + 500]

    json_type = {"Content-Type": "application/json"}
    with served(fake_server, log_path, max_body_bytes=1000) as server:
        async with httpx.AsyncClient(base_url=server.url, headers=json_type) as client:
            declared = await client.post("/generate", content=big)
            streamed = await client.post("/generate", content=chunked())
            pull = await client.post("/models/pull", content=big)
            small = await client.post("/generate", content=padded_body(1000))
        async with connect(f"{server.ws_url}/ws/generate") as ws:
            await ws.send(big.decode())
            frame, close_code, reason = await error_then_close(ws)

    assert streamed.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in streamed.request.headers
    for response in (declared, streamed, pull):
        assert response.status_code == 413
        error = response.json()["error"]
        assert (error["code"], error["id"]) == ("payload_too_large", response.headers["x-request-id"])
        assert "MINIVAULT_MAX_BODY_BYTES" in error["message"]
    assert "Content-Length says 2000 bytes" in declared.json()["error"]["message"]
    assert small.status_code == 200
    assert small.json()["response"] == "a" * (1000 - len('{"prompt": ""}'))
    assert (frame["type"], frame["code"], close_code) == ("error", "payload_too_large", 1009)
    assert reason == "payload_too_large"
    assert "MINIVAULT_MAX_BODY_BYTES" in frame["message"]
    logged = {
        line["id"]: (line["endpoint"], line["status"], (line["error"] or {}).get("code")) for line in read_log(log_path)
    }
    assert logged == {
        declared.headers["x-request-id"]: ("rest", "error", "payload_too_large"),
        streamed.headers["x-request-id"]: ("rest", "error", "payload_too_large"),
        small.headers["x-request-id"]: ("rest", "ok", None),
        frame["id"]: ("ws", "error", "payload_too_large"),
    }


def test_log_file_is_readable_by_its_owner_only(minivault: RunningServer, log_path: Path) -> None:
    previous = os.umask(0)  # the mode must not depend on a strict umask
    try:
        assert httpx.post(f"{minivault.url}/generate", json={"prompt": "hi"}).status_code == 200
        minivault.stop()
    finally:
        os.umask(previous)

    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    assert len(read_log(log_path)) == 1


async def test_log_prompts_off_keeps_lengths_and_no_text(fake_server: RunningServer, log_path: Path) -> None:
    prompt, system = "Sphinx riddle number seven", "Answer as the oracle of Delphi"
    with served(fake_server, log_path, log_prompts=False) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            ok = await client.post("/generate", json={"prompt": prompt, "system": system})
            rejected = await client.post("/generate", json={"prompt": prompt, "colour": "blue"})
        async with connect(f"{server.ws_url}/ws/generate") as ws:
            await ws.send(json.dumps({"prompt": prompt, "system": system}))
            ws_frames = await frames_until_end(ws)

    assert ok.status_code == 200
    assert ok.json()["response"] == prompt
    assert rejected.status_code == 422
    assert ws_frames[-1]["response"] == prompt
    texts = {line["id"]: (line["prompt"], line["system"], line["response"]) for line in read_log(log_path)}
    lengths = {line["id"]: (line["prompt_chars"], line["response_chars"]) for line in read_log(log_path)}
    ids = [ok.headers["x-request-id"], rejected.headers["x-request-id"], ws_frames[0]["id"]]
    assert texts == dict.fromkeys(ids, (None, None, None))
    assert lengths == {ids[0]: (len(prompt), len(prompt)), ids[1]: (len(prompt), 0), ids[2]: (len(prompt), len(prompt))}
    log_bytes = raw_log(log_path)
    for word in ("Sphinx", "riddle", "oracle", "Delphi"):
        assert word.encode() not in log_bytes
