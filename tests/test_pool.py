"""Several upstream hosts behind one MiniVault (OLLAMA_BASE_URLS, OPENAI_BASE_URLS): routing, failover before
the first token and never after, cooldowns, a restarted host coming back, and what /health, /models and /metrics
say of each host; fake Ollamas (and two minimal OpenAI-compatible fakes) on loopback."""

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Receive, Scope, Send

from app.main import create_app
from tests.conftest import closed_port_url, make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import FakeOllamaProcess, RunningServer, serve_in_thread
from tests.support.sse import aparse_events, parse_events

pytestmark = pytest.mark.anyio

STEP = 10.0  # generous bound on any single step that should take milliseconds
TINY, LLAMA = "tinyllama:1.1b-chat", "llama3:latest"


@contextmanager
def served(*apps: Any) -> Iterator[list[RunningServer]]:
    """Each fake on its own loopback port, until the block ends."""
    with ExitStack() as stack:
        yield [stack.enter_context(serve_in_thread(app, lifespan="off")) for app in apps]


@contextmanager
def gateway(urls: list[str], log_path: Path, **overrides: Any) -> Iterator[RunningServer]:
    """A started MiniVault in front of `urls`; hosts are checked at start-up, then a minute apart unless told."""
    field = "openai_base_urls" if overrides.get("backend") == "openai" else "ollama_base_urls"
    settings = make_settings(
        **{field: ",".join(urls), "log_path": log_path, "host_check_seconds": 60, "host_cooldown_seconds": 60,
           **overrides}
    )  # fmt: skip
    with serve_in_thread(create_app(settings)) as server:
        # Answered once the lifespan has run, so the hosts' first check is behind us.
        assert httpx.get(f"{server.url}/health", timeout=STEP).status_code == 200
        _UPSTREAMS[server.port] = urls
        yield server


# /health names each host by its label (host-1, host-2, ... in the configured order), never by URL.
_UPSTREAMS: dict[int, list[str]] = {}


def _by_url(server: RunningServer, listed: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {_UPSTREAMS[server.port][int(host["host"].removeprefix("host-")) - 1]: host for host in listed}


def hosts(server: RunningServer) -> dict[str, dict[str, Any]]:
    return _by_url(server, httpx.get(f"{server.url}/health").json()["hosts"])


async def ahosts(client: httpx.AsyncClient, server: RunningServer) -> dict[str, dict[str, Any]]:
    return _by_url(server, (await client.get(f"{server.url}/health")).json()["hosts"])


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample of the Prometheus exposition `text`, or None when it has no such series."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = STEP) -> None:
    """Poll an async `check()` until it returns true; fail naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)


class Stream:
    """One `stream: true` prompt on /generate, its events read one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.events = aparse_events(response)

    @classmethod
    async def open(cls, client: httpx.AsyncClient, server: RunningServer, prompt: str, model: str) -> "Stream":
        request = client.build_request(
            "POST", f"{server.url}/generate", json={"prompt": prompt, "model": model, "stream": True}
        )
        return cls(await client.send(request, stream=True))

    async def next(self) -> tuple[str, Any]:
        return await asyncio.wait_for(anext(self.events), STEP)

    async def rest(self) -> list[tuple[str, Any]]:
        return await asyncio.wait_for(_collect(self.events), STEP)

    async def close(self) -> None:
        await self.response.aclose()


async def _collect(events: AsyncIterator[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [event async for event in events]


def fake_with_loaded(first: str, *others: str, delay: float = 0.0) -> FakeOllama:
    """A fake whose /api/ps lists `first` as loaded (the fake lists its first model there)."""
    fake = FakeOllama(models=[first, *others], delay=delay)
    fake.models = list(dict.fromkeys(fake.models))  # `first` may be one of the special models it always has
    return fake


class FailingOllama(FakeOllama):
    """A host whose model runner crashed: it lists its models, and answers every prompt with Ollama's 500."""

    async def _generate(self, payload: dict[str, Any], receive: Receive, send: Send) -> None:
        self.requests.append(payload)
        body = orjson.dumps({"error": "llama runner process has terminated: signal: killed"})
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class FakeOpenAI:
    """A minimal OpenAI-compatible server: `/v1/models`, and `/v1/chat/completions` streaming the last message back
    word by word (model "slow": 400 tokens 20 ms apart, until the client leaves); `failing` makes it answer 500."""

    def __init__(self, models: list[str]) -> None:
        self.models = models
        self.failing = False
        self.prompts: list[str] = []  # every chat request, answered or not
        self.started = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        if scope["path"] == "/v1/models":
            await _send(send, 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})
            return
        body = b""
        while (message := await receive())["type"] == "http.request":
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        payload = orjson.loads(body)
        self.prompts.append(payload["messages"][-1]["content"])
        if self.failing or payload["model"] not in self.models:
            status = 500 if self.failing else 404
            await _send(send, status, {"error": {"message": f"fake says {status}", "type": "server_error"}})
            return
        self.started += 1
        tokens, delay = re.findall(r"\S+\s*", self.prompts[-1]), 0.0
        if payload["model"] == "slow":
            tokens, delay = [f"w{i} " for i in range(400)], 0.02
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        gone = asyncio.ensure_future(receive())  # the next message can only be http.disconnect
        try:
            for token in tokens:
                if delay:
                    await asyncio.wait([gone], timeout=delay)
                if gone.done():
                    return
                await _send_event(send, {"choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]})
            usage = {"prompt_tokens": len(tokens), "completion_tokens": len(tokens)}
            await _send_event(send, {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": usage})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        finally:
            gone.cancel()


async def _send(send: Send, status: int, body: dict[str, Any]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": orjson.dumps(body)})


async def _send_event(send: Send, chunk: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n", "more_body": True})


# --- where prompts go -------------------------------------------------------------------------------------


def test_prompts_land_only_on_hosts_that_have_the_model(log_path: Path) -> None:
    both, tiny_only, llama_only = FakeOllama(), FakeOllama(models=[TINY]), FakeOllama(models=["qwen2:0.5b", LLAMA])
    fakes = [both, tiny_only, llama_only]
    with served(*fakes) as servers, gateway([s.url for s in servers], log_path) as server:
        llama = [httpx.post(f"{server.url}/generate", json={"prompt": f"l{i}", "model": "llama3"}) for i in range(6)]
        tiny = [httpx.post(f"{server.url}/generate", json={"prompt": f"t{i}", "model": TINY}) for i in range(4)]
        qwen = httpx.post(f"{server.url}/generate", json={"prompt": "q", "model": "qwen2:0.5b"})
    urls = [s.url for s in servers]

    assert [(r.status_code, r.json()["response"]) for r in llama] == [(200, f"l{i}") for i in range(6)]
    assert [(r.status_code, r.json()["response"]) for r in tiny] == [(200, f"t{i}") for i in range(4)]
    assert (qwen.status_code, qwen.json()["response"]) == (200, "q")
    # Each fake saw only the models it has; the log names, for every answer, the host its fake says it served.
    asked = [Counter(request["model"] for request in fake.requests) for fake in fakes]
    assert asked[0]["llama3"] + asked[2]["llama3"] == 6
    assert asked[0][TINY] + asked[1][TINY] == 4
    assert set(asked[0]) <= {"llama3", TINY}
    assert set(asked[1]) == {TINY}
    assert set(asked[2]) <= {"llama3", "qwen2:0.5b"}
    assert asked[2]["qwen2:0.5b"] == 1
    lines = read_log(log_path)
    assert len(lines) == 11
    assert all(line["status"] == "ok" for line in lines)
    served_by = [Counter(line["model"] for line in lines if line["upstream"] == url) for url in urls]
    assert served_by == asked
    assert [fake.started for fake in fakes] == [fake.finished for fake in fakes] == [sum(a.values()) for a in asked]


def test_fleet_is_described_per_host_and_a_model_no_host_has_is_404_listing_the_fleet(log_path: Path) -> None:
    fakes = [FakeOllama(), FakeOllama(models=[TINY]), FakeOllama(models=["qwen2:0.5b", LLAMA])]
    with served(*fakes) as servers, gateway([s.url for s in servers], log_path) as server:
        answered = httpx.post(f"{server.url}/generate", json={"prompt": "hello", "model": "qwen2:0.5b"})
        missing = httpx.post(f"{server.url}/generate", json={"prompt": "hello", "model": "mistral:7b"})
        models = httpx.get(f"{server.url}/models").json()
        tags = httpx.get(f"{server.url}/api/tags").json()
        health, ready = httpx.get(f"{server.url}/health"), httpx.get(f"{server.url}/ready")
        text = httpx.get(f"{server.url}/metrics").text
    urls = [s.url for s in servers]
    fleet = sorted({name for fake in fakes for name in fake.models})

    assert (answered.status_code, answered.json()["response"]) == (200, "hello")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "model_not_found")
    message = missing.json()["error"]["message"]
    assert f"model 'mistral:7b' is on no healthy upstream host (the fleet has: {', '.join(fleet)})" in message
    assert [len(fake.requests) for fake in fakes] == [0, 0, 1]
    # /models and /api/tags: each model once; /models says which hosts have it, in the order they are configured.
    assert sorted(m["name"] for m in models["models"]) == sorted(m["name"] for m in tags["models"]) == fleet
    assert {m["name"]: m["details"]["hosts"] for m in models["models"]} == {
        name: [url for url, fake in zip(urls, fakes, strict=True) if name in fake.models] for name in fleet
    }
    assert models["default"] == TINY
    for response, status in ((health, "ok"), (ready, "ready")):
        assert (response.status_code, response.json()["status"]) == (200, status)
        assert response.json()["hosts"] == [
            {"host": f"host-{number}", "state": "ok", "models": sorted(fake.models), "loaded": [fake.models[0]],
             "in_flight": 0, "reason": None}
            for number, fake in enumerate(fakes, 1)
        ]  # fmt: skip
    assert metric(text, "minivault_host_requests_total", host=urls[2], outcome="ok") == 1
    assert metric(text, "minivault_host_in_flight", host=urls[2]) == 0
    assert [metric(text, "minivault_host_requests_total", host=url, outcome="ok") for url in urls[:2]] == [None] * 2
    assert [metric(text, "minivault_host_cooldowns_total", host=url) for url in urls] == [None] * 3
    lines = read_log(log_path)
    assert [(line["status"], line["upstream"]) for line in lines] == [("ok", urls[2]), ("error", None)]
    assert lines[1]["error"]["code"] == "model_not_found"


async def test_the_least_busy_host_gets_the_next_prompt(log_path: Path) -> None:
    a, b = FakeOllama(), FakeOllama()
    with served(a, b) as servers, gateway([s.url for s in servers], log_path) as server:
        urls = {a: servers[0].url, b: servers[1].url}
        async with httpx.AsyncClient(timeout=STEP) as client:
            # "slow" is on both hosts and loaded on neither (their /api/ps lists tinyllama): only load decides.
            first = await Stream.open(client, server, "one", "slow")
            assert await first.next() == ("token", {"content": "w0 "})
            busy, idle = (a, b) if a.started == 1 else (b, a)
            second = await Stream.open(client, server, "two", "slow")
            assert await second.next() == ("token", {"content": "w0 "})
            assert (busy.started, idle.started) == (1, 1)
            assert {url: h["in_flight"] for url, h in (await ahosts(client, server)).items()} == {
                urls[a]: 1,
                urls[b]: 1,
            }
            await first.close()
            await until(
                lambda: _in_flight(client, server, urls[busy], 0), f"{urls[busy]} in flight 0 once 'one' is closed"
            )
            third = await Stream.open(client, server, "three", "slow")
            assert await third.next() == ("token", {"content": "w0 "})
            assert (busy.started, idle.started) == (2, 1)
            for stream in (second, third):
                await stream.close()
            await until(lambda: _in_flight(client, server, None, 0), "nothing in flight")
            text = (await client.get(f"{server.url}/metrics")).text

    assert metric(text, "minivault_host_requests_total", host=urls[busy], outcome="cancelled") == 2
    assert metric(text, "minivault_host_requests_total", host=urls[idle], outcome="cancelled") == 1
    assert {line["prompt"]: (line["status"], line["upstream"]) for line in read_log(log_path)} == {
        "one": ("cancelled", urls[busy]), "two": ("cancelled", urls[idle]), "three": ("cancelled", urls[busy])
    }  # fmt: skip


async def _in_flight(client: httpx.AsyncClient, server: RunningServer, url: str | None, count: int) -> bool:
    """Whether the host at `url` (None: every host) has `count` prompts in flight, as /health says."""
    found = await ahosts(client, server)
    return all(host["in_flight"] == count for host_url, host in found.items() if url in (None, host_url))


async def test_a_host_with_the_model_loaded_wins_over_an_idle_one(log_path: Path) -> None:
    loaded = fake_with_loaded(LLAMA, TINY, delay=0.05)  # its /api/ps lists llama3
    idle = FakeOllama()  # has llama3 too, but its /api/ps lists tinyllama
    with served(loaded, idle) as servers, gateway([s.url for s in servers], log_path) as server:
        async with httpx.AsyncClient(timeout=STEP) as client:
            long = await Stream.open(client, server, " ".join(f"x{i}" for i in range(100)), "llama3")
            assert await long.next() == ("token", {"content": "x0 "})
            answers = [
                await client.post(f"{server.url}/generate", json={"prompt": f"p{i}", "model": "llama3"})
                for i in range(2)
            ]
            tiny = await client.post(f"{server.url}/generate", json={"prompt": "t", "model": TINY})
            state = await ahosts(client, server)
            await long.close()

    assert [(r.status_code, r.json()["response"]) for r in answers] == [(200, "p0"), (200, "p1")]
    assert (tiny.status_code, tiny.json()["response"]) == (200, "t")
    # Busy with the long answer, the host with llama3 loaded still took both: no load wait beats an idle host.
    assert [request["prompt"] for request in loaded.requests][1:] == ["p0", "p1"]
    assert [request["prompt"] for request in idle.requests] == ["t"]
    assert state[servers[0].url]["in_flight"] == 1
    assert LLAMA in state[servers[0].url]["loaded"]
    assert state[servers[1].url]["loaded"] == [TINY]
    upstreams = {line["prompt"]: line["upstream"] for line in read_log(log_path)}
    assert upstreams == {loaded.requests[0]["prompt"]: servers[0].url, "p0": servers[0].url, "p1": servers[0].url,
                         "t": servers[1].url}  # fmt: skip


# --- failures before the first token: the next host answers -----------------------------------------------


async def test_a_dead_host_fails_over_before_the_first_token_and_is_cooled_down(log_path: Path) -> None:
    survivors = [fake_with_loaded(LLAMA, TINY), fake_with_loaded(LLAMA, TINY)]
    with FakeOllamaProcess() as dead, served(*survivors) as servers:
        urls = [s.url for s in servers]
        with gateway([dead.url, *urls], log_path) as server:
            await asyncio.to_thread(dead.kill)  # after start-up, and the next check is a minute away
            async with httpx.AsyncClient(timeout=STEP) as client:
                # tinyllama is loaded only on the dead host (its /api/ps), so the first prompt goes there first.
                first = await Stream.open(client, server, "first answer", TINY)
                events = await first.rest()
                rest = await asyncio.gather(
                    *(client.post(f"{server.url}/generate", json={"prompt": f"p{i}", "model": TINY}) for i in range(5))
                )
                state = await ahosts(client, server)
                text = (await client.get(f"{server.url}/metrics")).text

    assert [name for name, _ in events] == ["token", "token", "done"]
    assert events[-1][1]["response"] == "first answer"
    assert [(r.status_code, r.json()["response"]) for r in rest] == [(200, f"p{i}") for i in range(5)]
    # Every prompt answered, once: the survivors were asked exactly the six prompts between them.
    asked = sorted(request["prompt"] for fake in survivors for request in fake.requests)
    assert asked == sorted(["first answer", *(f"p{i}" for i in range(5))])
    assert sum(fake.started for fake in survivors) == sum(fake.finished for fake in survivors) == 6
    assert metric(text, "minivault_host_cooldowns_total", host=dead.url) == 1
    assert metric(text, "minivault_host_requests_total", host=dead.url, outcome="failed") == 1
    assert sum(metric(text, "minivault_host_requests_total", host=url, outcome="ok") or 0 for url in urls) == 6
    assert state[dead.url]["state"] == "cooling"
    assert "cannot reach Ollama at host-1" in state[dead.url]["reason"]
    assert [state[url]["state"] for url in urls] == ["ok", "ok"]
    lines = read_log(log_path)
    assert len(lines) == len({line["id"] for line in lines}) == 6
    assert {line["status"] for line in lines} == {"ok"}
    assert Counter(line["upstream"] for line in lines) == Counter(
        {url: fake.started for url, fake in zip(urls, survivors, strict=True)}
    )


def test_a_host_answering_500_before_the_first_token_is_cooled_down_and_the_next_host_answers(
    log_path: Path,
) -> None:
    failing = FailingOllama(models=[LLAMA, TINY])  # its /api/ps lists llama3, so it is tried first
    healthy = FakeOllama()
    with served(failing, healthy) as servers, gateway([s.url for s in servers], log_path) as server:
        first = httpx.post(f"{server.url}/generate", json={"prompt": "first", "model": "llama3"})
        second = httpx.post(f"{server.url}/generate", json={"prompt": "second", "model": "llama3"})
        state = hosts(server)
        text = httpx.get(f"{server.url}/metrics").text
    failing_url, healthy_url = (s.url for s in servers)

    assert [(r.status_code, r.json()["response"]) for r in (first, second)] == [(200, "first"), (200, "second")]
    # Cooling down, the failing host is not asked again.
    assert [request["prompt"] for request in failing.requests] == ["first"]
    assert [request["prompt"] for request in healthy.requests] == ["first", "second"]
    assert state[failing_url]["state"] == "cooling"
    assert "Ollama answered 500: llama runner process has terminated" in state[failing_url]["reason"]
    assert metric(text, "minivault_host_cooldowns_total", host=failing_url) == 1
    assert metric(text, "minivault_host_requests_total", host=failing_url, outcome="failed") == 1
    assert metric(text, "minivault_host_requests_total", host=healthy_url, outcome="ok") == 2
    assert [(line["status"], line["upstream"]) for line in read_log(log_path)] == [("ok", healthy_url)] * 2


def test_every_host_failing_before_the_first_token_is_503_naming_each(log_path: Path) -> None:
    fakes = [FakeOllama(), FakeOllama()]
    with served(*fakes) as servers, gateway([s.url for s in servers], log_path) as server:
        response = httpx.post(f"{server.url}/generate", json={"prompt": "x", "model": "fail-500"})
        text = httpx.get(f"{server.url}/metrics").text

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "backend_unavailable"
    assert error["message"].startswith("every upstream host that has 'fail-500' failed or is cooling down: ")
    for url in (s.url for s in servers):
        assert f"{url} (cooling down for 60 s after: Ollama answered 500: llama runner process" in error["message"]
        assert metric(text, "minivault_host_cooldowns_total", host=url) == 1
    assert [[request["model"] for request in fake.requests] for fake in fakes] == [["fail-500"], ["fail-500"]]
    (line,) = read_log(log_path)
    assert (line["error"]["code"], line["upstream"]) == ("backend_unavailable", servers[1].url)


def test_no_healthy_host_at_all_is_503_naming_every_url(log_path: Path) -> None:
    urls = [closed_port_url(), closed_port_url()]
    with gateway(urls, log_path) as server:
        response = httpx.post(f"{server.url}/generate", json={"prompt": "x"})
        models = httpx.get(f"{server.url}/models")
        ready = httpx.get(f"{server.url}/ready")

    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "backend_unavailable"
    assert error["message"].startswith("no upstream host is healthy: ")
    assert all(f"{url} (Ollama at {url} does not answer its checks" in error["message"] for url in urls)
    assert (models.status_code, models.json()["error"]["code"]) == (503, "backend_unavailable")
    assert ready.status_code == 503
    labels = ["host-1", "host-2"]
    assert [(h["host"], h["state"], h["models"], h["in_flight"]) for h in ready.json()["hosts"]] == [
        (label, "down", [], 0) for label in labels
    ]
    assert not any(url.removeprefix("http://") in ready.text for url in urls)  # open to anyone: labels, not URLs
    assert all(f"{label}: Ollama at {label} does not answer" in ready.json()["reason"] for label in labels)


# --- failures after the first token: never retried --------------------------------------------------------


async def _until_end(stream: Stream) -> list[tuple[str, Any]]:
    events = [await stream.next()]
    while events[-1][0] not in ("done", "error"):
        events.append(await stream.next())
    return events


async def test_a_host_dying_mid_answer_ends_that_stream_with_an_error_and_nothing_is_retried(log_path: Path) -> None:
    survivor = FakeOllama()
    with FakeOllamaProcess() as dying, served(survivor) as (survivor_server,):
        with gateway([dying.url, survivor_server.url], log_path) as server:
            async with httpx.AsyncClient(timeout=STEP) as client:
                streams = [await Stream.open(client, server, f"s{i}", "slow") for i in range(2)]
                try:
                    for stream in streams:
                        assert await stream.next() == ("token", {"content": "w0 "})
                    # Both hosts have "slow", neither loaded: the least busy split put one stream on each.
                    assert survivor.started == 1
                    await asyncio.to_thread(dying.kill)
                    ends = [asyncio.create_task(_until_end(stream)) for stream in streams]
                    done, pending = await asyncio.wait(ends, timeout=STEP, return_when=asyncio.FIRST_COMPLETED)
                    assert (len(done), len(pending)) == (1, 1)
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    broken = ends.index(done.pop())
                    events = ends[broken].result()
                finally:
                    for stream in streams:
                        await stream.close()
                await asyncio.to_thread(survivor.wait_until, lambda f: f.disconnects == 1, STEP)
                await until(lambda: _in_flight(client, server, None, 0), "nothing in flight")
                text = (await client.get(f"{server.url}/metrics")).text

    assert [name for name, _ in events[:-1]] == ["token"] * (len(events) - 1)
    assert events[-1][0] == "error"
    assert events[-1][1]["error"]["code"] == "backend_error"
    # The survivor still has "slow" and was idle enough, but the broken answer was not sent to it again.
    assert (survivor.started, survivor.finished, survivor.disconnects) == (1, 0, 1)
    assert [request["prompt"] for request in survivor.requests] == [f"s{1 - broken}"]
    assert metric(text, "minivault_host_requests_total", host=dying.url, outcome="failed") == 1
    assert metric(text, "minivault_host_requests_total", host=survivor_server.url, outcome="cancelled") == 1
    lines = {line["prompt"]: line for line in read_log(log_path)}
    assert len(lines) == 2
    cut, kept = lines[f"s{broken}"], lines[f"s{1 - broken}"]
    assert (cut["status"], cut["error"]["code"], cut["upstream"]) == ("error", "backend_error", dying.url)
    assert cut["response"] == "w0 " + "".join(data["content"] for _, data in events[:-1])
    assert (kept["status"], kept["upstream"]) == ("cancelled", survivor_server.url)


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "rest"])
def test_a_stream_cut_mid_answer_is_not_retried_on_another_host(log_path: Path, stream: bool) -> None:
    cutting = fake_with_loaded("break:latest", TINY)  # its /api/ps lists break, so it is chosen
    other = FakeOllama()  # has break too
    with served(cutting, other) as servers, gateway([s.url for s in servers], log_path) as server:
        response = httpx.post(f"{server.url}/generate", json={"prompt": "cut here", "model": "break", "stream": stream})

    if stream:
        events = list(parse_events(iter(response.text.splitlines())))
        assert [name for name, _ in events] == ["token", "token", "error"]
        assert events[-1][1]["error"]["code"] == "backend_error"
    else:
        assert (response.status_code, response.json()["error"]["code"]) == (502, "backend_error")
    assert (cutting.started, other.started, other.requests) == (1, 0, [])
    (line,) = read_log(log_path)
    assert (line["status"], line["error"]["code"], line["upstream"]) == ("error", "backend_error", servers[0].url)


# --- a host coming back ---------------------------------------------------------------------------------


async def _state_is(client: httpx.AsyncClient, server: RunningServer, url: str, state: str) -> bool:
    return (await ahosts(client, server))[url]["state"] == state


async def test_a_restarted_host_comes_back_into_rotation_after_its_next_check(log_path: Path) -> None:
    steady = FakeOllama()
    with FakeOllamaProcess() as restarted, served(steady) as (steady_server,):
        urls = [restarted.url, steady_server.url]
        # A check must answer within its interval: 0.5 s leaves room on a loaded machine, and keeps this test short.
        with gateway(urls, log_path, host_check_seconds=0.5, host_cooldown_seconds=0.2) as server:
            async with httpx.AsyncClient(timeout=STEP) as client:
                await asyncio.to_thread(restarted.kill)
                await until(lambda: _state_is(client, server, restarted.url, "down"), "the killed host is down")
                busy = await Stream.open(client, server, "busy", "slow")
                try:
                    assert await busy.next() == ("token", {"content": "w0 "})
                    during = [
                        await client.post(f"{server.url}/generate", json={"prompt": f"d{i}", "model": TINY})
                        for i in range(2)
                    ]
                    assert steady.started == 3
                    await asyncio.to_thread(restarted.restart)
                    await until(lambda: _state_is(client, server, restarted.url, "ok"), "the restarted host is ok")
                    # tinyllama is loaded on both; the steady host is busy with "slow", so the restarted one answers.
                    back = await client.post(f"{server.url}/generate", json={"prompt": "back", "model": TINY})
                finally:
                    await busy.close()
            await asyncio.to_thread(steady.wait_until, lambda f: f.disconnects == 1, STEP)

    assert [(r.status_code, r.json()["response"]) for r in during] == [(200, "d0"), (200, "d1")]
    assert (back.status_code, back.json()["response"]) == (200, "back")
    assert [request["prompt"] for request in steady.requests] == ["busy", "d0", "d1"]
    assert {line["prompt"]: (line["status"], line["upstream"]) for line in read_log(log_path)} == {
        "busy": ("cancelled", steady_server.url), "d0": ("ok", steady_server.url), "d1": ("ok", steady_server.url),
        "back": ("ok", restarted.url),
    }  # fmt: skip


# --- many at once -----------------------------------------------------------------------------------------


async def test_concurrent_prompts_are_each_answered_once_and_spread_over_the_hosts(log_path: Path) -> None:
    fakes = [FakeOllama(delay=0.02) for _ in range(3)]
    prompts = [f"prompt {i} here" for i in range(20)]
    with served(*fakes) as servers, gateway([s.url for s in servers], log_path, max_concurrency=20) as server:
        async with httpx.AsyncClient(timeout=STEP) as client:
            responses = await asyncio.gather(
                *(client.post(f"{server.url}/generate", json={"prompt": p, "model": TINY}) for p in prompts)
            )
            text = (await client.get(f"{server.url}/metrics")).text
    urls = [s.url for s in servers]

    assert [(r.status_code, r.json()["response"]) for r in responses] == [(200, p) for p in prompts]
    assert sorted(request["prompt"] for fake in fakes for request in fake.requests) == sorted(prompts)
    assert [fake.finished for fake in fakes] == [fake.started for fake in fakes]
    assert sum(fake.started for fake in fakes) == 20
    assert all(fake.started > 0 for fake in fakes), [fake.started for fake in fakes]
    assert [metric(text, "minivault_host_requests_total", host=url, outcome="ok") for url in urls] == [
        fake.started for fake in fakes
    ]
    assert [metric(text, "minivault_host_in_flight", host=url) for url in urls] == [0, 0, 0]
    lines = read_log(log_path)
    assert sorted(line["prompt"] for line in lines) == sorted(prompts)
    assert Counter(line["upstream"] for line in lines) == Counter(
        {url: fake.started for url, fake in zip(urls, fakes, strict=True)}
    )


# --- several OpenAI-compatible servers ------------------------------------------------------------------


async def test_openai_compatible_servers_are_routed_the_same_way(log_path: Path) -> None:
    first, second = FakeOpenAI(["m1", "slow"]), FakeOpenAI(["m1", "m2"])
    with served(first, second) as servers:
        urls = [s.url for s in servers]
        with gateway(urls, log_path, backend="openai", openai_model="m1") as server:
            async with httpx.AsyncClient(timeout=STEP) as client:

                async def generate(prompt: str, model: str) -> httpx.Response:
                    return await client.post(f"{server.url}/generate", json={"prompt": prompt, "model": model})

                # Only the first has "slow"; while it streams, the idle second takes the m1 prompts.
                busy = await Stream.open(client, server, "busy", "slow")
                try:
                    assert await busy.next() == ("token", {"content": "w0 "})
                    spread = [await generate(f"a{i}", "m1") for i in range(3)]
                    only_second = await generate("b", "m2")
                    missing = await generate("c", "m9")
                    models = (await client.get(f"{server.url}/models")).json()
                    # The second fails before its first token: cooled down, and the busy first answers instead.
                    second.failing = True
                    failed_over = await generate("d", "m1")
                    state = await ahosts(client, server)
                    text = (await client.get(f"{server.url}/metrics")).text
                finally:
                    await busy.close()

    assert [(r.status_code, r.json()["response"]) for r in spread] == [(200, "a0"), (200, "a1"), (200, "a2")]
    assert (only_second.status_code, only_second.json()["response"]) == (200, "b")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "model_not_found")
    assert "(the fleet has: m1, m2, slow)" in missing.json()["error"]["message"]
    assert (failed_over.status_code, failed_over.json()["response"]) == (200, "d")
    assert (first.prompts, first.started) == (["busy", "d"], 2)
    assert (second.prompts, second.started) == (["a0", "a1", "a2", "b", "d"], 4)
    assert {m["name"]: m["details"]["hosts"] for m in models["models"]} == {
        "m1": urls, "slow": urls[:1], "m2": urls[1:]
    }  # fmt: skip
    assert [state[url]["state"] for url in urls] == ["ok", "cooling"]
    assert metric(text, "minivault_host_cooldowns_total", host=urls[1]) == 1
    assert metric(text, "minivault_host_requests_total", host=urls[1], outcome="ok") == 4
    assert metric(text, "minivault_host_requests_total", host=urls[0], outcome="ok") == 1
    assert {line["prompt"]: line["upstream"] for line in read_log(log_path)} == {
        "busy": urls[0], "a0": urls[1], "a1": urls[1], "a2": urls[1], "b": urls[1], "c": None, "d": urls[0]
    }  # fmt: skip
