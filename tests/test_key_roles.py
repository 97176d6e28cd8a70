"""A key is not root: model management needs an admin key, model names may only send Ollama to allowed
registries, and no key may take more than its share of the queue, in process and across replicas with Redis.

Each attack is sent as an ordinary key holder (or an admin) would, against a real MiniVault in front of the
fake Ollama wrapped in a recorder, so "refused" also means "nothing reached Ollama".
"""

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.types import Message, Receive, Scope, Send

from app.admission.opening import open_limits, queue_share, redis_client
from app.admission.redis_slots import RedisAdmission
from app.admission.slots import Admission, Ticket
from app.core.model_policy import check_management, registry_host
from app.errors import Busy, QueueShareExceeded
from app.main import create_app
from tests.conftest import make_settings
from tests.support.fake_ollama import FakeOllama
from tests.support.redis_server import RedisServer
from tests.support.servers import RunningServer, serve_in_thread
from tests.support.sse import aparse_events

pytestmark = pytest.mark.anyio

STEP = 10.0  # generous bound on any single step that should take milliseconds
ORDINARY, ADMIN, OTHER = "k-ordinary-7Qx", "k-admin-3Zp", "k-other-9Wm"
DIGEST = "sha256:29fdb92e57cf0827ded04ae6461b5931d01fa595843f55d36f5b275a52087dd2"
ADMISSION = "minivault:{admission}:"


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    body: bytes


class Recorder:
    """The fake Ollama, recording every request that reaches it; answers the management routes it lacks itself."""

    def __init__(self) -> None:
        self.fake = FakeOllama()
        self.seen: list[Seen] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message: Message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.seen.append(Seen(scope["method"], scope["path"], body))
        path = scope["path"]
        if path in ("/api/push", "/api/create", "/api/copy") or path.startswith("/api/blobs/"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b"" if path == "/api/copy" else b'{"status":"success"}'})
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.fake(scope, replay, send)

    def management(self) -> list[Seen]:
        """What reached Ollama besides the probes MiniVault itself sends (`/api/version`, `/api/tags`)."""
        return [seen for seen in self.seen if seen.path not in ("/api/version", "/api/tags", "/")]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def upstream(recorder: Recorder) -> Iterator[RunningServer]:
    with serve_in_thread(recorder, lifespan="off") as server:
        yield server


@contextmanager
def gateway(upstream: RunningServer, log_path: Path, **overrides: Any) -> Iterator[RunningServer]:
    settings = make_settings(ollama_base_url=upstream.url, log_path=log_path, **overrides)
    with serve_in_thread(create_app(settings)) as server:
        yield server


KEYED = {"api_keys": ORDINARY, "admin_keys": ADMIN}


def auth(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict[str, Any] | bytes | None
    # What Ollama is sent: the same request, except /models/pull, which MiniVault turns into Ollama's pull.
    forwarded: Seen

    def send(self, client: httpx.Client, key: str | None) -> httpx.Response:
        headers = auth(key)
        if isinstance(self.body, bytes):
            headers["Content-Type"] = "application/octet-stream"
            return client.request(self.method, self.path, content=self.body, headers=headers)
        if self.body is None:
            return client.request(self.method, self.path, headers=headers)
        return client.request(self.method, self.path, json=self.body, headers=headers)


def _call(method: str, path: str, body: dict[str, Any] | bytes | None) -> Call:
    raw = body if isinstance(body, bytes) else b"" if body is None else orjson.dumps(body)
    return Call(method, path, body, Seen(method, path, raw))


MANAGEMENT = {
    "models-pull": Call("POST", "/models/pull", {"model": "phi3:mini"},
                        Seen("POST", "/api/pull", orjson.dumps({"model": "phi3:mini", "stream": True}))),
    "pull": _call("POST", "/api/pull", {"model": "phi3:mini"}),
    "push": _call("POST", "/api/push", {"model": "me/phi3:mini"}),
    "create": _call("POST", "/api/create", {"model": "mario", "from": "llama3", "system": "You are Mario."}),
    "copy": _call("POST", "/api/copy", {"source": "llama3", "destination": "llama3-backup"}),
    "delete": _call("DELETE", "/api/delete", {"model": "llama3:latest"}),
    "blob-exists": _call("HEAD", f"/api/blobs/{DIGEST}", None),
    "blob-upload": _call("POST", f"/api/blobs/{DIGEST}", b"GGUF\x00 some layer bytes"),
}  # fmt: skip


# --- admin keys --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MANAGEMENT)
def test_an_ordinary_key_gets_403_on_every_management_route_and_ollama_receives_nothing(
    upstream: RunningServer, recorder: Recorder, log_path: Path, name: str
) -> None:
    call = MANAGEMENT[name]
    with gateway(upstream, log_path, **KEYED) as server, httpx.Client(base_url=server.url, timeout=STEP) as client:
        response = call.send(client, ORDINARY)

    assert response.status_code == 403, response.text
    assert recorder.seen == []
    if call.method == "HEAD":
        assert response.content == b""
        return
    expected = (
        f"{call.method} {call.path} manages the models every key uses, so it needs an admin key "
        "(MINIVAULT_ADMIN_KEYS); this key is an ordinary one (MINIVAULT_API_KEYS)"
    )
    if call.path.startswith("/api/"):  # Ollama's shape
        assert response.json() == {"error": expected}
    else:
        assert response.json() == {
            "error": {"code": "forbidden", "message": expected, "id": response.headers["x-request-id"]}
        }
    assert fake_models_unchanged(recorder)


def fake_models_unchanged(recorder: Recorder) -> bool:
    return "phi3:mini" not in recorder.fake.models and "llama3:latest" in recorder.fake.models


@pytest.mark.parametrize("name", MANAGEMENT)
@pytest.mark.parametrize("key", [ADMIN, None], ids=["admin-key", "no-keys"])
def test_an_admin_key_and_a_keyless_install_manage_models_passed_through_as_sent(
    upstream: RunningServer, recorder: Recorder, log_path: Path, name: str, key: str | None
) -> None:
    call = MANAGEMENT[name]
    # Pushing is off by default whoever asks; here the route itself is under test.
    overrides = {**(KEYED if key else {}), "allow_push": True}
    with gateway(upstream, log_path, **overrides) as server, httpx.Client(base_url=server.url, timeout=STEP) as client:
        response = call.send(client, key)
        if name == "models-pull":
            assert response.text.rstrip().endswith('event: done\ndata: {"status":"success"}')

    assert response.status_code == 200, response.text
    assert recorder.seen == [call.forwarded]


def test_the_routes_above_are_every_route_behind_the_management_check(log_path: Path) -> None:
    app = create_app(make_settings(log_path=log_path))
    routes = [(c, set(c.methods or ())) for c in iter_route_contexts(app.routes) if isinstance(c.route, APIRoute)]
    gated = {
        (method, c.path)
        for c, methods in routes
        if any(dep.dependency is check_management for dep in c.route.dependencies)
        for method in methods
    }
    expected = {(call.method, call.path.replace(DIGEST, "{digest}")) for call in MANAGEMENT.values()}
    assert gated == expected
    # Everything else Ollama's API passes through is not management: embeddings, and what only reads.
    ollama = {(method, c.path) for c, methods in routes if c.path.startswith("/api/") for method in methods}
    assert ollama - gated == {
        ("POST", "/api/generate"), ("POST", "/api/chat"), ("GET", "/api/tags"), ("POST", "/api/show"),
        ("GET", "/api/ps"), ("GET", "/api/version"), ("POST", "/api/embed"), ("POST", "/api/embeddings"),
    }  # fmt: skip


def test_the_ordinary_key_still_generates_and_an_admin_key_is_a_key_too(
    upstream: RunningServer, log_path: Path
) -> None:
    with gateway(upstream, log_path, **KEYED) as server, httpx.Client(base_url=server.url, timeout=STEP) as client:
        answers = [
            client.post("/generate", json={"prompt": "hi there"}, headers=auth(key)) for key in (ORDINARY, ADMIN)
        ]
        models = client.get("/api/tags", headers=auth(ORDINARY))
        nobody = client.post("/api/pull", json={"model": "phi3:mini"})

    assert [(a.status_code, a.json()["response"]) for a in answers] == [(200, "hi there")] * 2
    assert models.status_code == 200  # reading what is there is not managing it
    assert nobody.status_code == 401  # no key at all is still refused before anything else


# --- registries --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "host"),
    [
        ("llama3", None),
        ("llama3:8b", None),
        ("library/llama3:8b", None),
        ("user/model", None),
        ("registry.ollama.ai/library/llama3", None),
        ("Registry.Ollama.AI/library/llama3", None),
        ("https://registry.ollama.ai/library/llama3", None),
        ("evil.example/ns/model", "evil.example"),
        ("EVIL.example/ns/model:7b", "evil.example"),
        ("myregistry/ns/model", "myregistry"),  # three parts: the first is a host, as Ollama reads it
        ("evil.example/model", "evil.example"),
        ("localhost/model", "localhost"),
        ("localhost:5000/ns/model", "localhost:5000"),
        ("10.0.0.8:5000/model", "10.0.0.8:5000"),
        ("[::1]:5000/ns/model", "[::1]:5000"),
        ("http://evil.example/ns/model", "evil.example"),
        ("x://y://evil.example/ns/model", "evil.example"),
    ],
)
def test_registry_host_reads_names_as_ollama_does(name: str, host: str | None) -> None:
    assert registry_host(name) == host


def post(client: httpx.Client, path: str, body: dict[str, Any] | bytes, key: str | None = ADMIN) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={**auth(key), "Content-Type": "application/json"})
    return client.post(path, json=body, headers=auth(key))


def refused_for_host(response: httpx.Response, name: str, host: str) -> None:
    assert response.status_code == 403, response.text
    assert response.json() == {
        "error": f"'{name}' names the registry host '{host}', and Ollama would fetch it from (or send it to) that "
        f"host; use a name from Ollama's library (no host), or add {host} to MINIVAULT_PULL_REGISTRIES"
    }


FOREIGN = "evil.example:5000/ns/model:latest"


def test_a_pull_from_a_foreign_registry_is_refused_even_for_an_admin(
    upstream: RunningServer, recorder: Recorder, log_path: Path
) -> None:
    with gateway(upstream, log_path, **KEYED) as server, httpx.Client(base_url=server.url, timeout=STEP) as client:
        api = post(client, "/api/pull", {"model": FOREIGN})
        older = post(client, "/api/pull", {"name": FOREIGN})
        # Go's JSON decoder matches keys ignoring case: `MODEL` is the model Ollama would pull.
        cased = post(client, "/api/pull", {"model": "llama3", "MODEL": FOREIGN})
        rest = post(client, "/models/pull", {"model": FOREIGN})
        # Bytes Go would decode (invalid UTF-8 becomes U+FFFD) but that cannot be checked: not passed on either.
        opaque = post(client, "/api/pull", b'{"model": "' + FOREIGN.encode() + b'", "x": "\xff"}')
        trailing = post(client, "/api/pull", b'{"model": "' + FOREIGN.encode() + b'"} {}')
        library = post(client, "/api/pull", {"model": "library/phi3:mini"})

    for response in (api, older, cased):
        refused_for_host(response, FOREIGN, "evil.example:5000")
    assert rest.status_code == 403
    error = rest.json()["error"]
    assert (error["code"], error["id"]) == ("registry_not_allowed", rest.headers["x-request-id"])
    assert "'evil.example:5000'" in error["message"] and "MINIVAULT_PULL_REGISTRIES" in error["message"]
    for response in (opaque, trailing):
        assert response.status_code == 400
        assert response.json()["error"].startswith("/api/pull: the body must be one JSON object")
    assert library.status_code == 200
    assert recorder.management() == [Seen("POST", "/api/pull", orjson.dumps({"model": "library/phi3:mini"}))]


def test_a_listed_registry_may_be_pulled_from(upstream: RunningServer, recorder: Recorder, log_path: Path) -> None:
    name = "Registry.Example.com/team/model:1"
    with (
        gateway(upstream, log_path, **KEYED, pull_registries="https://registry.example.com/, other.example") as server,
        httpx.Client(base_url=server.url, timeout=STEP) as client,
    ):
        api = post(client, "/api/pull", {"model": name})
        rest = post(client, "/models/pull", {"model": "other.example/team/model"})
        unlisted = post(client, "/api/pull", {"model": FOREIGN})

    assert (api.status_code, rest.status_code) == (200, 200)
    assert api.text.splitlines()[-1] == '{"status":"success"}'
    refused_for_host(unlisted, FOREIGN, "evil.example:5000")
    assert [seen.body for seen in recorder.management()] == [
        orjson.dumps({"model": name}),
        orjson.dumps({"model": "other.example/team/model", "stream": True}),
    ]


INSECURE = (
    "`insecure: true` talks to the registry without checking its TLS certificate (or over plain HTTP), so anyone on "
    "the network path can swap the model; it is refused unless MINIVAULT_ALLOW_INSECURE_REGISTRIES=true"
)


@pytest.mark.parametrize("allowed", [False, True], ids=["default", "allowed"])
def test_insecure_is_refused_unless_allowed(
    upstream: RunningServer, recorder: Recorder, log_path: Path, allowed: bool
) -> None:
    bodies = [{"model": "phi3:mini", "insecure": True}, {"model": "phi3:mini", "inſecure": True}]
    with (
        gateway(upstream, log_path, **KEYED, allow_insecure_registries=allowed) as server,
        httpx.Client(base_url=server.url, timeout=STEP) as client,
    ):
        responses = [post(client, "/api/pull", body) for body in bodies]
        secure = post(client, "/api/pull", {"model": "phi3:mini", "insecure": False})

    assert secure.status_code == 200
    if allowed:
        assert [r.status_code for r in responses] == [200, 200]
        assert len(recorder.management()) == 3
    else:
        assert [(r.status_code, r.json()) for r in responses] == [(403, {"error": INSECURE})] * 2
        assert recorder.management() == [Seen("POST", "/api/pull", orjson.dumps({"model": "phi3:mini",
                                                                                  "insecure": False}))]  # fmt: skip


def test_push_is_refused_unless_allowed_and_then_only_to_allowed_registries(
    upstream: RunningServer, recorder: Recorder, log_path: Path
) -> None:
    with gateway(upstream, log_path, **KEYED) as server, httpx.Client(base_url=server.url, timeout=STEP) as client:
        default = post(client, "/api/push", {"model": "me/mario:latest"})
    assert default.status_code == 403
    assert default.json() == {
        "error": "POST /api/push uploads a model's files from this machine to a registry (what was fine-tuned or "
        "built here leaves it); it is refused unless MINIVAULT_ALLOW_PUSH=true"
    }
    assert recorder.management() == []

    with (
        gateway(upstream, log_path, **KEYED, allow_push=True) as server,
        httpx.Client(base_url=server.url, timeout=STEP) as client,
    ):
        library = post(client, "/api/push", {"model": "me/mario:latest"})
        foreign = post(client, "/api/push", {"model": FOREIGN})
        insecure = post(client, "/api/push", {"model": "me/mario:latest", "insecure": True})
    assert library.status_code == 200
    refused_for_host(foreign, FOREIGN, "evil.example:5000")
    assert (insecure.status_code, insecure.json()) == (403, {"error": INSECURE})
    assert recorder.management() == [Seen("POST", "/api/push", orjson.dumps({"model": "me/mario:latest"}))]


def test_copy_and_create_may_not_name_a_foreign_registry(
    upstream: RunningServer, recorder: Recorder, log_path: Path
) -> None:
    with (
        gateway(upstream, log_path, **KEYED, allow_push=True) as server,
        httpx.Client(base_url=server.url, timeout=STEP) as client,
    ):
        # The attack: copy a model to a foreign registry's name, then push that name there.
        copied = post(client, "/api/copy", {"source": "llama3", "destination": FOREIGN})
        cased = post(client, "/api/copy", {"source": "llama3", "destination": "ok", "Destination": FOREIGN})
        pushed = post(client, "/api/push", {"model": FOREIGN, "insecure": True})
        created_from = post(client, "/api/create", {"model": "mario", "from": FOREIGN})
        created_as = post(client, "/api/create", {"model": FOREIGN, "from": "llama3"})
        modelfile = post(client, "/api/create", {"model": "mario", "modelfile": f"# old API\n  from {FOREIGN}\n"})
        local_copy = post(client, "/api/copy", {"source": "llama3", "destination": "me/llama3-backup"})
        local_create = post(client, "/api/create", {"model": "mario", "from": "llama3"})

    for response in (copied, cased, created_from, created_as, modelfile):
        refused_for_host(response, FOREIGN, "evil.example:5000")
    assert (pushed.status_code, pushed.json()) == (403, {"error": INSECURE})
    assert (local_copy.status_code, local_create.status_code) == (200, 200)
    assert [(seen.path, orjson.loads(seen.body)) for seen in recorder.management()] == [
        ("/api/copy", {"source": "llama3", "destination": "me/llama3-backup"}),
        ("/api/create", {"model": "mario", "from": "llama3"}),
    ]


# --- the fair queue: in process ----------------------------------------------------------------------------


def test_the_queue_share_is_half_the_queue_once_several_keys_exist(log_path: Path) -> None:
    def share(**overrides: Any) -> int | None:
        return queue_share(make_settings(log_path=log_path, max_queue=10, **overrides))

    assert share() is None
    assert share(api_keys=ORDINARY) is None
    assert share(admin_keys=ADMIN) is None
    assert share(api_keys=ADMIN, admin_keys=ADMIN) is None  # one key, named twice
    assert share(api_keys=ORDINARY, admin_keys=ADMIN) == 5
    assert share(api_keys=f"{ORDINARY},{OTHER}") == 5
    assert share(api_keys=f"{ORDINARY},{OTHER}", max_queue_per_key=3) == 3
    assert share(max_queue_per_key=2) == 2
    assert queue_share(make_settings(log_path=log_path, max_queue=7, api_keys=f"{ORDINARY},{OTHER}")) == 4


async def test_admission_counts_each_keys_places_and_gives_them_back_on_leave_and_admission() -> None:
    admission = Admission(1, 10, max_per_key=2)
    assert await admission.try_enter()
    a1, a2 = await admission.enqueue("a"), await admission.enqueue("a")
    with pytest.raises(QueueShareExceeded) as refused:
        await admission.enqueue("a")
    b1 = await admission.enqueue("b")
    anonymous = [await admission.enqueue(None), await admission.enqueue(None)]
    with pytest.raises(QueueShareExceeded) as refused_anonymous:
        await admission.enqueue(None)
    assert [await admission.position(t) for t in (a1, a2, b1, *anonymous)] == [1, 2, 3, 4, 5]

    error = refused.value
    assert (error.status, error.code, error.retry_after, error.headers) == (429, "queue_share_exceeded", 3, {
        "Retry-After": "3"})  # fmt: skip
    assert error.message == (
        "this API key already holds 2 places in MiniVault's queue, a key's share (MINIVAULT_MAX_QUEUE_PER_KEY=2); "
        "wait for those prompts to start, and retry after 3 s"
    )
    assert isinstance(error, Busy)
    assert refused_anonymous.value.message.startswith("prompts without an API key already hold 2 places")

    await admission.leave(a2)  # given up: a place for `a` again
    a3 = await admission.enqueue("a")
    await admission.release(1.0)  # the slot goes to a1: admitted, it no longer counts as queued
    assert a1.admitted
    a4 = await admission.enqueue("a")
    with pytest.raises(QueueShareExceeded):
        await admission.enqueue("a")
    assert [await admission.position(t) for t in (b1, *anonymous, a3, a4)] == [1, 2, 3, 4, 5]
    for ticket in (b1, *anonymous, a3, a4):
        await admission.leave(ticket)
    assert (admission.waiting, admission._held) == (0, {})


async def test_a_full_queue_is_busy_before_any_share_is_counted() -> None:
    admission = Admission(1, 3, max_per_key=2)
    assert await admission.try_enter()
    for key in ("a", "a", "b"):
        await admission.enqueue(key)
    with pytest.raises(Busy) as refused:
        await admission.enqueue("c")
    assert refused.value.code == "busy"


class Opened(list[httpx.Response]):
    """The streams a test opened, in the order they were answered, with what each was answered (`results`),
    and their event readers: a reader dropped would close its stream (and so give up its place) when the
    garbage collector finalizes it."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: list[AsyncIterator[tuple[str, Any]]] = []
        self.results: list[tuple[httpx.Response, tuple[int, Any]]] = []

    async def close(self) -> None:
        for response in self:
            await response.aclose()

    def answered(self, result: tuple[int, Any]) -> httpx.Response:
        [response] = [response for response, seen in self.results if seen == result]
        return response


@asynccontextmanager
async def streams() -> AsyncIterator[Opened]:
    opened = Opened()
    try:
        yield opened
    finally:
        await opened.close()


async def open_stream(client: httpx.AsyncClient, url: str, key: str, opened: Opened) -> tuple[int, Any]:
    """A `stream: true` prompt (to "hang": admitted, it would never end); (200, first SSE event) when accepted,
    else (status, (error body, Retry-After))."""
    body = {"prompt": "wait for me", "model": "hang", "stream": True}
    request = client.build_request("POST", f"{url}/generate", json=body, headers=auth(key))
    response = await client.send(request, stream=True)
    opened.append(response)
    if response.status_code != 200:
        await response.aread()
        result: tuple[int, Any] = response.status_code, (response.json(), response.headers.get("retry-after"))
    else:
        events = aparse_events(response)
        opened.readers.append(events)
        result = 200, await asyncio.wait_for(anext(events), STEP)
    opened.results.append((response, result))
    return result


@asynccontextmanager
async def slot_held(client: httpx.AsyncClient, url: str, recorder: Recorder) -> AsyncIterator[None]:
    """One prompt holding the only slot until the block ends: "hang" sends nothing until its client leaves."""
    body = {"prompt": "hold the slot", "model": "hang", "stream": True}
    holder = asyncio.create_task(client.post(f"{url}/generate", json=body, headers=auth(ADMIN)))
    try:
        await asyncio.to_thread(recorder.fake.wait_until, lambda fake: fake.started == 1, STEP)
        yield
    finally:
        holder.cancel()  # closes its connection: Ollama sees the client go
        await asyncio.gather(holder, return_exceptions=True)


async def queued_gauge(client: httpx.AsyncClient, url: str, count: int) -> None:
    deadline = time.monotonic() + STEP
    while f"\nminivault_queued {count:.1f}\n" not in (await client.get(f"{url}/metrics", headers=auth(ADMIN))).text:
        assert time.monotonic() < deadline, f"the queue never held {count}"
        await asyncio.sleep(0.02)


def share_refusal(result: tuple[int, Any], share: int) -> None:
    status, (body, retry_after) = result
    assert status == 429
    error = body["error"]
    assert (error["code"], str(error["retry_after"])) == ("queue_share_exceeded", retry_after)
    assert int(retry_after) >= 1
    assert error["message"].startswith(
        f"this API key already holds {share} places in MiniVault's queue, a key's share "
        f"(MINIVAULT_MAX_QUEUE_PER_KEY={share})"
    )


async def test_one_keys_burst_takes_half_the_queue_and_another_key_still_gets_a_place(
    upstream: RunningServer, recorder: Recorder, log_path: Path
) -> None:
    keys = {"api_keys": f"{ORDINARY},{OTHER}", "admin_keys": ADMIN}
    with gateway(upstream, log_path, **keys, max_concurrency=1, max_queue=10) as server:
        async with (
            httpx.AsyncClient(timeout=STEP) as client,
            streams() as opened,
            slot_held(client, server.url, recorder),
        ):
            burst = await asyncio.gather(*(open_stream(client, server.url, ORDINARY, opened) for _ in range(8)))
            queued = [data["position"] for status, (name, data) in (r for r in burst if r[0] == 200)]
            assert sorted(queued) == [1, 2, 3, 4, 5]
            refused = [r for r in burst if r[0] == 429]
            assert len(refused) == 3
            for result in refused:
                share_refusal(result, 5)
            # The other key is not locked out: it gets the other half of the queue, then the queue is full.
            other = [await open_stream(client, server.url, OTHER, opened) for _ in range(6)]
            assert other[:5] == [(200, ("queued", {"position": position})) for position in range(6, 11)]
            status, (body, retry_after) = other[5]
            assert (status, body["error"]["code"]) == (429, "busy")
            assert retry_after is not None
            # A place given up is the key's again.
            await opened.answered((200, ("queued", {"position": 1}))).aclose()
            await queued_gauge(client, server.url, 9)
            again = await open_stream(client, server.url, ORDINARY, opened)
            assert again == (200, ("queued", {"position": 10}))
            # With a place free in the queue, the key at its share still gets none; the other key does.
            await opened.answered(other[0]).aclose()
            await queued_gauge(client, server.url, 9)
            share_refusal(await open_stream(client, server.url, ORDINARY, opened), 5)
            assert await open_stream(client, server.url, OTHER, opened) == (200, ("queued", {"position": 10}))
            # Everyone queued leaves before the slot is freed, so none of them is ever admitted.
            await opened.close()
            await queued_gauge(client, server.url, 0)

    generated = [seen for seen in recorder.seen if seen.path == "/api/generate"]
    assert len(generated) == 1  # the queued prompts never reached Ollama


# --- the fair queue: across replicas with Redis ------------------------------------------------------------


@asynccontextmanager
async def replica(url: str, limit: int, max_queue: int, share: int | None, lease: float = 30.0,
                  start: bool = True) -> AsyncIterator[RedisAdmission]:  # fmt: skip
    """One replica's admission, with a Redis client of its own (not started: it renews nothing, like a dead one)."""
    client = redis_client(url)
    admission = RedisAdmission(client, limit, max_queue, lease, max_per_key=share)
    if start:
        await admission.start()
    try:
        yield admission
    finally:
        await admission.aclose()
        await client.aclose()


def shares(server: RedisServer) -> tuple[dict[bytes, bytes], int, int]:
    """Places held per key, ids with an owner, and the queue's length, as Redis holds them."""
    with server.client() as client:
        return (client.hgetall(f"{ADMISSION}shares"), client.hlen(f"{ADMISSION}owners"),
                client.zcard(f"{ADMISSION}queue"))  # fmt: skip


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + STEP
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.01)


async def test_two_replicas_share_each_keys_count_and_give_it_back_on_leave_admission_and_expiry(
    redis_url: str, redis_server: RedisServer
) -> None:
    async with replica(redis_url, 1, 10, 2) as a, replica(redis_url, 1, 10, 2) as b:
        assert await a.try_enter()
        first = await a.enqueue("k1")
        second = await b.enqueue("k1")
        for side in (a, b):
            with pytest.raises(QueueShareExceeded) as refused:
                await side.enqueue("k1")
            assert (refused.value.code, refused.value.status) == ("queue_share_exceeded", 429)
            assert refused.value.message.startswith("this API key already holds 2 places")
        other = await b.enqueue("k2")
        anonymous = await a.enqueue()
        assert shares(redis_server) == ({b"k1": b"2", b"k2": b"1", b"": b"1"}, 4, 4)

        await b.leave(second)  # given up on one replica: the other may queue for k1 again
        await until(lambda: shares(redis_server)[0].get(b"k1") == b"1", "the place left was given back")
        third = await a.enqueue("k1")
        await a.release(1.0)  # the slot goes to `first`: admitted, no longer a queued place
        await until(lambda: first.admitted, "the head was admitted")
        assert shares(redis_server) == ({b"k1": b"1", b"k2": b"1", b"": b"1"}, 3, 3)
        fourth = await b.enqueue("k1")
        with pytest.raises(QueueShareExceeded):
            await b.enqueue("k1")
        for side, ticket in ((b, other), (a, anonymous), (a, third), (b, fourth)):
            await side.leave(ticket)
        await until(lambda: shares(redis_server) == ({}, 0, 0), "every place was given back")

        # A replica that renews nothing (it died): once its places' leases run out, its key may queue again.
        async with replica(redis_url, 1, 10, 2, lease=0.3, start=False) as dead:
            await dead.enqueue("k1")
            await dead.enqueue("k1")
            with pytest.raises(QueueShareExceeded):
                await a.enqueue("k1")
            revived = await enqueue_once_expired(a, "k1")
            assert shares(redis_server) == ({b"k1": b"1"}, 1, 1)
            await a.leave(revived)
        await a.release()
    await until(lambda: shares(redis_server) == ({}, 0, 0), "all given back on close")


async def enqueue_once_expired(admission: RedisAdmission, key: str) -> Ticket:
    """Enqueue `key`, retrying while its share is still taken (by places whose leases are about to run out)."""
    deadline = time.monotonic() + STEP
    while True:
        try:
            return await admission.enqueue(key)
        except QueueShareExceeded:
            assert time.monotonic() < deadline, "the dead replica's places never expired"
            await asyncio.sleep(0.02)


async def test_open_limits_gives_both_limiters_the_share(redis_url: str, log_path: Path) -> None:
    settings = {"log_path": log_path, "api_keys": f"{ORDINARY},{OTHER}", "max_queue": 6}
    async with AsyncExitStack() as stack:
        local, _ = await open_limits(make_settings(**settings), stack)
        shared, _ = await open_limits(make_settings(**settings, redis_url=redis_url), stack)
        assert isinstance(local, Admission) and isinstance(shared, RedisAdmission)
        assert (local.max_per_key, shared.max_per_key) == (3, 3)


async def test_a_keys_burst_across_two_replicas_with_redis_stops_at_its_share(
    upstream: RunningServer, recorder: Recorder, log_path: Path, tmp_path: Path, redis_url: str,
    redis_server: RedisServer,
) -> None:  # fmt: skip
    keys = {"api_keys": f"{ORDINARY},{OTHER}", "admin_keys": ADMIN}
    common = {**keys, "max_concurrency": 1, "max_queue": 10, "redis_url": redis_url}
    with (
        gateway(upstream, log_path, **common) as one,
        gateway(upstream, tmp_path / "two" / "log.jsonl", **common) as two,
    ):
        async with (
            httpx.AsyncClient(timeout=STEP) as client,
            streams() as opened,
            slot_held(client, one.url, recorder),
        ):
            positions = []
            for server in (one, two, one, two, one):
                status, (name, data) = await open_stream(client, server.url, ORDINARY, opened)
                positions.append((status, name, data["position"]))
            assert positions == [(200, "queued", position) for position in range(1, 6)]
            for server in (one, two):
                share_refusal(await open_stream(client, server.url, ORDINARY, opened), 5)
            assert await open_stream(client, two.url, OTHER, opened) == (200, ("queued", {"position": 6}))
            assert shares(redis_server)[0] == {
                hashed(ORDINARY).encode(): b"5", hashed(OTHER).encode(): b"1"
            }  # fmt: skip
            await opened.close()
            await until(lambda: shares(redis_server) == ({}, 0, 0), "both replicas gave their places back")
    assert len([seen for seen in recorder.seen if seen.path == "/api/generate"]) == 1


def hashed(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]
