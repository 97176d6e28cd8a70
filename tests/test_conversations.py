"""Conversations: the API, the context sent upstream (trimmed, system first), serialized writers, and failures."""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from app.main import create_app
from tests.conftest import make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

pytestmark = pytest.mark.anyio


def served(fake_server: RunningServer, log_path: Path, **overrides: Any) -> Iterator[RunningServer]:
    settings = make_settings(ollama_base_url=fake_server.url, log_path=log_path, **overrides)
    with serve_in_thread(create_app(settings)) as server:
        yield server


@pytest.fixture
def server(fake_server: RunningServer, log_path: Path) -> Iterator[RunningServer]:
    yield from served(fake_server, log_path)


def chat_messages(fake: FakeOllama) -> list[list[tuple[str, str]]]:
    """What each /api/chat request carried, as (role, content) pairs."""
    return [[(m["role"], m["content"]) for m in r["messages"]] for r in fake.requests if r.get("chat")]


def test_a_conversation_is_created_continued_listed_read_and_forgotten(server: RunningServer, fake: FakeOllama) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        created = client.post("/conversations", json={"system": "Be brief."})
        assert created.status_code == 201
        conversation_id = created.json()["id"]
        assert created.json() == {"id": conversation_id, "title": None, "system": "Be brief.",
                                  "created": created.json()["created"], "updated": created.json()["updated"],
                                  "turns": None}  # fmt: skip
        first = client.post("/generate", json={"prompt": "red green", "conversation_id": conversation_id})
        second = client.post("/generate", json={"prompt": "blue", "conversation_id": conversation_id})
        listed = client.get("/conversations").json()
        read = client.get(f"/conversations/{conversation_id}").json()
        deleted = client.delete(f"/conversations/{conversation_id}")
        after = client.get(f"/conversations/{conversation_id}")
        deleted_again = client.delete(f"/conversations/{conversation_id}")

    assert (first.json()["response"], second.json()["response"]) == ("red green", "blue")
    assert chat_messages(fake) == [
        [("system", "Be brief."), ("user", "red green")],
        [("system", "Be brief."), ("user", "red green"), ("assistant", "red green"), ("user", "blue")],
    ]
    assert [(item["id"], item["title"]) for item in listed["items"]] == [(conversation_id, "red green")]
    assert listed["next_cursor"] is None
    assert [(t["prompt"], t["response"], t["exchange_id"]) for t in read["turns"]] == [
        ("red green", "red green", first.json()["id"]),
        ("blue", "blue", second.json()["id"]),
    ]
    assert (read["turn_count"], read["next_cursor"]) == (2, None)  # one page holds them all
    assert deleted.status_code == 204
    assert after.status_code == 404 and after.json()["error"]["code"] == "not_found"
    assert deleted_again.status_code == 404


def test_an_unknown_id_starts_a_conversation_and_a_plain_prompt_stays_on_generate(
    server: RunningServer, fake: FakeOllama
) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        client.post("/generate", json={"prompt": "solo"})
        client.post("/generate", json={"prompt": "hello there", "conversation_id": "mine-1"})
        read = client.get("/conversations/mine-1").json()

    assert [("chat" in r, r["prompt"]) for r in fake.requests] == [(False, "solo"), (True, "hello there")]
    assert read["title"] == "hello there" and len(read["turns"]) == 1


@pytest.mark.parametrize(
    ("limits", "kept"),
    [
        ({"max_turns": 2}, ["t3", "t4"]),
        ({"max_context_chars": 7}, ["t4"]),
        ({"max_context_chars": 8}, ["t3", "t4"]),
        ({"max_turns": 1, "max_context_chars": 3}, []),
    ],
)
def test_context_keeps_the_latest_turns_that_fit_and_never_drops_the_system_prompt(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path, limits: dict[str, int], kept: list[str]
) -> None:
    for server in served(fake_server, log_path, **limits):
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for prompt in ("t1", "t2", "t3", "t4", "last"):  # each turn is 4 characters: "tN" twice
                body = {"prompt": prompt, "conversation_id": "c", "system": "S"}
                assert client.post("/generate", json=body).status_code == 200

    messages = chat_messages(fake)[-1]
    expected = [("system", "S")]
    for prompt in kept:
        expected += [("user", prompt), ("assistant", prompt)]
    assert messages == [*expected, ("user", "last")]


def test_a_failed_or_cancelled_answer_is_logged_but_not_kept_as_a_turn(
    server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        ok = client.post("/generate", json={"prompt": "kept", "conversation_id": "f"})
        failed = client.post("/generate", json={"prompt": "x y z", "conversation_id": "f", "model": "error-line"})
        with client.stream("POST", "/generate", json={"prompt": "p", "conversation_id": "f", "model": "slow",
                                                      "stream": True}) as response:  # fmt: skip
            next(response.iter_lines())
        fake.wait_until(lambda f: f.disconnects == 1)
        after = client.post("/generate", json={"prompt": "next", "conversation_id": "f"})
        turns = client.get("/conversations/f").json()["turns"]
    server.stop()

    assert (ok.status_code, failed.status_code, after.status_code) == (200, 502, 200)
    assert [t["prompt"] for t in turns] == ["kept", "next"]
    assert chat_messages(fake)[-1] == [("user", "kept"), ("assistant", "kept"), ("user", "next")]
    statuses = [(line["status"], line["conversation_id"]) for line in read_log(log_path)]
    assert statuses == [("ok", "f"), ("error", "f"), ("cancelled", "f"), ("ok", "f")]


async def test_two_writers_to_one_conversation_are_serialized(server: RunningServer, fake: FakeOllama) -> None:
    fake.delay = 0.02
    async with httpx.AsyncClient(base_url=server.url, timeout=20) as client:
        first = asyncio.create_task(client.post("/generate", json={"prompt": "one two three four",
                                                                    "conversation_id": "s"}))  # fmt: skip
        # The first prompt reached the model, so it holds the conversation.
        await anyio.to_thread.run_sync(lambda: fake.wait_until(lambda f: len(f.requests) == 1))
        second = await client.post("/generate", json={"prompt": "five", "conversation_id": "s"})
        await first

    # The second waited for the first answer and saw it in its context, never interleaved.
    assert chat_messages(fake) == [
        [("user", "one two three four")],
        [("user", "one two three four"), ("assistant", "one two three four"), ("user", "five")],
    ]
    assert second.json()["response"] == "five"


async def test_conversations_over_the_websocket(server: RunningServer, fake: FakeOllama) -> None:
    async with connect(f"{server.ws_url}/ws/generate") as ws:
        for prompt in ("alpha", "beta"):
            await ws.send(json.dumps({"prompt": prompt, "conversation_id": "ws-1"}))
            while (frame := json.loads(await ws.recv()))["type"] != "done":
                assert frame["type"] in ("start", "token")

    assert chat_messages(fake)[-1] == [("user", "alpha"), ("assistant", "alpha"), ("user", "beta")]


def test_listing_pages_newest_first_without_repeats(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for name in ("a", "b", "c", "d", "e"):
            client.post("/generate", json={"prompt": f"about {name}", "conversation_id": name})
        client.post("/generate", json={"prompt": "again", "conversation_id": "b"})  # b moves to the top
        seen, cursor = [], None
        while True:
            page = client.get("/conversations", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += [item["id"] for item in page["items"]]
            if not (cursor := page["next_cursor"]):
                break
        bad = client.get("/conversations", params={"cursor": "not-a-cursor"})

    assert seen == ["b", "e", "d", "c", "a"]
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


def test_conversations_are_refused_when_texts_may_not_be_stored(
    fake_server: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    for server in served(fake_server, log_path, log_prompts=False):
        with httpx.Client(base_url=server.url, timeout=10) as client:
            prompt = client.post("/generate", json={"prompt": "hi", "conversation_id": "x"})
            created = client.post("/conversations")

    for response in (prompt, created):
        assert response.status_code == 422
        assert "MINIVAULT_LOG_PROMPTS=false" in response.json()["error"]["message"]
    assert fake.requests == []
