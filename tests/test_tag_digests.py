"""`/api/tags` on backends that are not Ollama: every model has a digest of its own, 64 hex digits, the same
on every call and after a restart (llm-ollama groups models by digest: with one shared empty digest it showed
one model and sent its name for all the others)."""

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ollama
import orjson
from starlette.types import Receive, Scope, Send

from app.main import create_app
from tests.conftest import make_settings
from tests.support.dialect_servers import embedded_gateway, wait_started
from tests.support.servers import RunningServer, serve_in_thread

HEX64 = re.compile(r"[0-9a-f]{64}")


class FakeModels:
    """An OpenAI-compatible server that only lists models (`/v1/models`)."""

    def __init__(self, models: list[str]) -> None:
        self.models = models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http" and scope["path"] == "/v1/models", scope["path"]
        body = {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fake"} for m in self.models]}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": orjson.dumps(body)})


@contextmanager
def minivault(log_path: Path, **settings: Any) -> Iterator[RunningServer]:
    with serve_in_thread(create_app(make_settings(log_path=log_path, **settings))) as server:
        yield wait_started(server)


def listed(server: RunningServer) -> dict[str, str]:
    """Each model's digest, as the ollama client reads `/api/tags`."""
    with ollama.Client(host=server.url, timeout=30) as client:
        return {model.model: model.digest for model in client.list().models}  # type: ignore[misc]


def assert_own_digests(digests: dict[str, str], names: list[str]) -> None:
    assert sorted(digests) == sorted(names)
    assert all(HEX64.fullmatch(digest) for digest in digests.values()), digests
    assert len(set(digests.values())) == len(names), digests


def test_each_model_of_an_openai_compatible_server_has_its_own_stable_digest(tmp_path: Path) -> None:
    names = ["tinyllama:1.1b-chat", "llama3:latest", "qwen2:0.5b"]
    with serve_in_thread(FakeModels(names), lifespan="off") as upstream:
        with minivault(tmp_path / "a.jsonl", backend="openai", openai_base_url=upstream.url) as server:
            first, again = listed(server), listed(server)
        with minivault(tmp_path / "b.jsonl", backend="openai", openai_base_url=upstream.url) as restarted:
            after_restart = listed(restarted)

    assert_own_digests(first, names)
    assert again == first
    assert after_restart == first
    # What goes in: the name and the size (none listed here).
    assert first["llama3:latest"] == hashlib.sha256(b'["llama3:latest",null]').hexdigest()


def test_a_pools_merged_listing_keeps_one_digest_per_model_whatever_hosts_have_it(tmp_path: Path) -> None:
    with (
        serve_in_thread(FakeModels(["m1", "m2"]), lifespan="off") as first,
        serve_in_thread(FakeModels(["m1", "m3"]), lifespan="off") as second,
    ):
        urls = f"{first.url},{second.url}"
        with minivault(tmp_path / "pool.jsonl", backend="openai", openai_base_urls=urls, openai_model="m1") as pool:
            merged = listed(pool)
        with minivault(tmp_path / "one.jsonl", backend="openai", openai_base_url=first.url) as single:
            alone = listed(single)

    assert_own_digests(merged, ["m1", "m2", "m3"])
    # Which hosts have a model is no part of its identity: m1 on both hosts is m1 on the first alone.
    assert {name: merged[name] for name in alone} == alone


def test_the_embedded_engines_model_has_a_digest_that_survives_a_restart(tmp_path: Path) -> None:
    with embedded_gateway(tmp_path / "a.jsonl") as gateway:
        first = listed(gateway.server)
        model = gateway.model
    with embedded_gateway(tmp_path / "b.jsonl") as gateway:
        after_restart = listed(gateway.server)

    assert_own_digests(first, [model])
    assert after_restart == first
