"""WS /ws/generate driven by the `websockets` client library against a real server."""

import json
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer

pytestmark = pytest.mark.anyio


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await ws.recv(decode=True))


async def frames_until_end(ws: ClientConnection) -> list[dict[str, Any]]:
    frames = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(await recv(ws))
    return frames


async def test_prompt_streams_start_tokens_done(minivault: RunningServer, log_path: Path) -> None:
    async with connect(f"{minivault.ws_url}/ws/generate") as ws:
        await ws.send(json.dumps({"prompt": "Tell me a joke."}))
        frames = await frames_until_end(ws)

    start, *tokens, done = frames
    assert start["type"] == "start"
    assert start["model"] == "tinyllama:1.1b-chat"
    assert [t["type"] for t in tokens] == ["token"] * 4
    assert "".join(t["content"] for t in tokens) == "Tell me a joke."
    assert done["type"] == "done"
    assert done["response"] == "Tell me a joke."
    assert done["id"] == start["id"]
    assert done["usage"] == {"prompt_tokens": 4, "completion_tokens": 4}
    minivault.stop()
    [line] = read_log(log_path)
    assert (line["endpoint"], line["id"], line["status"]) == ("ws", start["id"], "ok")


async def test_tokens_arrive_before_the_upstream_finishes(minivault: RunningServer, fake: FakeOllama) -> None:
    async with connect(f"{minivault.ws_url}/ws/generate") as ws:
        await ws.send(json.dumps({"prompt": "x", "model": "slow", "options": {"num_predict": 25}}))
        assert (await recv(ws))["type"] == "start"
        assert await recv(ws) == {"type": "token", "content": "w0 "}
        assert fake.finished == 0
        rest = await frames_until_end(ws)
    assert [f["type"] for f in rest] == ["token"] * 24 + ["done"]


async def test_connection_serves_several_prompts_and_survives_bad_frames(
    minivault: RunningServer, log_path: Path
) -> None:
    async with connect(f"{minivault.ws_url}/ws/generate") as ws:
        await ws.send("{not json")
        bad_json = await recv(ws)
        await ws.send(json.dumps({"prompt": "  "}))
        blank = await recv(ws)
        await ws.send(json.dumps({"prompt": "hi", "model": "absent"}))
        missing = await frames_until_end(ws)
        await ws.send(json.dumps({"prompt": "first", "id": "client-1"}))
        first = await frames_until_end(ws)
        await ws.send(json.dumps({"type": "generate", "prompt": "second"}))
        second = await frames_until_end(ws)

    assert (bad_json["type"], bad_json["code"]) == ("error", "invalid_request")
    assert "not valid JSON" in bad_json["message"]
    assert (blank["type"], blank["code"], blank["message"]) == ("error", "invalid_request", "prompt: must not be blank")
    assert [f["type"] for f in missing] == ["start", "error"]
    assert missing[-1]["code"] == "model_not_found"
    assert "ollama pull absent" in missing[-1]["message"]
    assert first[-1]["response"] == "first"
    assert first[-1]["id"] == "client-1"
    assert second[-1]["response"] == "second"
    minivault.stop()
    lines = read_log(log_path)
    assert [(line["status"], (line["error"] or {}).get("code")) for line in lines] == [
        ("error", "invalid_request"),
        ("error", "invalid_request"),
        ("error", "model_not_found"),
        ("ok", None),
        ("ok", None),
    ]


async def test_cancel_stops_the_generation_and_answers_done(
    minivault: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    async with connect(f"{minivault.ws_url}/ws/generate") as ws:
        await ws.send(json.dumps({"prompt": "x", "model": "slow"}))
        assert (await recv(ws))["type"] == "start"
        assert (await recv(ws))["type"] == "token"
        await ws.send(json.dumps({"type": "cancel"}))
        frames = await frames_until_end(ws)
        fake.wait_until(lambda f: f.disconnects == 1)
        # The socket stays usable after a cancel.
        await ws.send(json.dumps({"prompt": "after cancel"}))
        after = await frames_until_end(ws)

    done = frames[-1]
    assert done["type"] == "done"
    assert done["done_reason"] == "cancelled"
    assert done["response"].startswith("w0 ")
    assert len(done["response"].split()) < 400
    assert after[-1]["response"] == "after cancel"
    minivault.stop()
    assert [line["status"] for line in read_log(log_path)] == ["cancelled", "ok"]


async def test_second_prompt_while_busy_is_an_error_frame(minivault: RunningServer) -> None:
    async with connect(f"{minivault.ws_url}/ws/generate") as ws:
        await ws.send(json.dumps({"prompt": "x", "model": "slow", "options": {"num_predict": 30}}))
        assert (await recv(ws))["type"] == "start"
        await ws.send(json.dumps({"prompt": "too soon"}))
        frames = [await recv(ws)]
        while frames[-1]["type"] != "error":
            frames.append(await recv(ws))
        rest = await frames_until_end(ws)

    assert frames[-1]["code"] == "invalid_request"
    assert '{"type": "cancel"}' in frames[-1]["message"]
    assert rest[-1]["type"] == "done"
    assert rest[-1]["done_reason"] == "length"


async def test_disconnect_mid_stream_closes_the_upstream_request(
    minivault: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    async with connect(f"{minivault.ws_url}/ws/generate") as ws:
        await ws.send(json.dumps({"prompt": "x", "model": "slow"}))
        assert (await recv(ws))["type"] == "start"
        assert (await recv(ws))["type"] == "token"
    fake.wait_until(lambda f: f.disconnects == 1)
    assert fake.finished == 0
    minivault.stop()
    [line] = read_log(log_path)
    assert (line["endpoint"], line["status"], line["done_reason"]) == ("ws", "cancelled", "cancelled")


async def test_handshake_carries_the_request_id(minivault: RunningServer) -> None:
    async with connect(f"{minivault.ws_url}/ws/generate", additional_headers={"X-Request-ID": "ws-conn-1"}) as ws:
        assert ws.response is not None
        assert ws.response.headers["x-request-id"] == "ws-conn-1"
