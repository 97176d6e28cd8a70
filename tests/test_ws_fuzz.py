"""WS /ws/generate fed bad frames of every kind: each gets exactly one `invalid_request` error frame, the
connection keeps serving prompts, and every refusal leaves one log line."""

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.main import create_app
from tests.conftest import make_settings, read_log
from tests.support.fake_ollama import FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

pytestmark = pytest.mark.anyio
MAX_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 1000
NEW_ID = re.compile(r"[0-9a-f]{32}")
NOT_JSON = "the frame is not valid JSON"
NOT_OBJECT = 'each frame must be a JSON object like {"prompt": "Hello"}'


def nested(depth: int, leaf: object) -> object:
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


# (what, frame, a phrase the error message must contain); each on its own on one connection.
BAD_FRAMES: list[tuple[str, str | bytes, str]] = [
    ("broken JSON", '{"prompt": "hi"', NOT_JSON),
    ("plain text", "tell me a joke", NOT_JSON),
    ("empty text frame", "", NOT_JSON),
    ("whitespace", " \n\t ", NOT_JSON),
    ("empty binary frame", b"", NOT_JSON),
    ("binary, not UTF-8", b"\xff\xfe\x00\x81", NOT_JSON),
    ("binary JSON array", b'[{"prompt": "hi"}]', NOT_OBJECT),
    ("array", '[{"prompt": "hi"}]', NOT_OBJECT),
    ("empty array", "[]", NOT_OBJECT),
    ("number", "42", NOT_OBJECT),
    ("float", "-1.5e300", NOT_OBJECT),
    ("string", '"hello"', NOT_OBJECT),
    ("true", "true", NOT_OBJECT),
    ("null", "null", NOT_OBJECT),
    ("empty object", "{}", "prompt: is required"),
    ("prompt a number", '{"prompt": 5}', "prompt: Input should be a valid string"),
    ("prompt a list", '{"prompt": ["a", "b"]}', "prompt: Input should be a valid string"),
    ("prompt null", '{"prompt": null}', "prompt: Input should be a valid string"),
    ("prompt deeply nested", json.dumps({"prompt": nested(500, "x")}), "prompt: Input should be a valid string"),
    ("blank prompt", '{"prompt": " \\n "}', "prompt: must not be blank"),
    ("prompt too long", json.dumps({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}), "MINIVAULT_MAX_PROMPT_CHARS"),
    ("options a string", '{"prompt": "hi", "options": "hot"}', "options: Input should be a valid dictionary"),
    ("options a list", '{"prompt": "hi", "options": [1]}', "options: Input should be a valid dictionary"),
    ("option of a wrong type", '{"prompt": "hi", "options": {"temperature": "hot"}}', "options.temperature: "),
    ("unknown option", '{"prompt": "hi", "options": {"temprature": 1}}', "options.temprature: unknown field"),
    ("unknown field", '{"prompt": "hi", "temprature": 1}', "temprature: unknown field; remove it"),
    ("model empty", '{"prompt": "hi", "model": ""}', "model: String should have at least 1 character"),
    ("stream a string", '{"prompt": "hi", "stream": "yes"}', "stream: Input should be a valid boolean"),
    ("deep options", json.dumps({"prompt": "hi", "options": nested(500, 1)}), "options.a: unknown field"),
    ("too deep for JSON", "[" * 2000 + "]" * 2000, "depth limit exceeded"),
    ("2,000 unknown fields", json.dumps({"prompt": "hi", **{f"k{i}": i for i in range(2000)}}), "1980 more problems"),
    ("unknown type", '{"type": "subscribe", "prompt": "hi"}', 'type: unknown frame type "subscribe"'),
    ("type a number", '{"type": 7}', "type: unknown frame type 7"),
    ("type null", '{"type": null}', "type: unknown frame type null"),
]


@pytest.fixture
def vault(fake_server: RunningServer, log_path: Path) -> Iterator[RunningServer]:
    # Room for every bad frame here: the close after MINIVAULT_WS_MAX_INVALID_FRAMES is tests/test_refusals.py's.
    settings = make_settings(
        ollama_base_url=fake_server.url, log_path=log_path, max_body_bytes=MAX_BYTES, max_prompt_chars=MAX_PROMPT_CHARS,
        ws_max_invalid_frames=10_000,
    )  # fmt: skip
    with serve_in_thread(create_app(settings)) as server:
        yield server


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await ws.recv(decode=True))


async def answer(ws: ClientConnection, prompt: str, request_id: str) -> None:
    """Send a valid prompt and check the very next frames are its start, its tokens and its done."""
    await ws.send(json.dumps({"prompt": prompt, "id": request_id}))
    frames = [await recv(ws)]
    while frames[-1]["type"] not in ("done", "error"):
        frames.append(await recv(ws))
    start, *tokens, done = frames
    assert start == {"type": "start", "id": request_id, "model": "tinyllama:1.1b-chat"}
    assert [frame["type"] for frame in tokens] == ["token"] * len(prompt.split())
    assert (done["type"], done["id"], done["response"]) == ("done", request_id, prompt)


async def refused(ws: ClientConnection, frame: str | bytes) -> dict[str, Any]:
    await ws.send(frame)
    error = await recv(ws)
    assert (error["type"], error["code"]) == ("error", "invalid_request"), error
    return error


def burst_frame(rng: random.Random, index: int) -> tuple[str | bytes, str | None]:
    """A random bad frame, and the id its error frame must carry (None: one MiniVault makes up)."""
    request_id = f"burst-{index}"
    kind = rng.randrange(8)
    if kind == 0:
        return "x" + "".join(rng.choice('{}[]":,. abcé🌍\\') for _ in range(rng.randrange(40))), None
    if kind == 1:
        return b"\xff" + rng.randbytes(rng.randrange(60)), None
    if kind == 2:
        return rng.choice(["[]", "[1, 2]", "0", "-7.25", '"s"', "true", "false", "null", b"[{}]", b"3"]), None
    if kind == 3:
        return rng.choice(["", b"", " ", "\n"]), None
    if kind == 4:
        prompt = rng.choice([5, 1.5, True, None, [], ["a"], {"a": 1}, " ", ""])
        return json.dumps({"id": request_id, "prompt": prompt}), request_id
    if kind == 5:
        options = rng.choice(["hot", [], 3, {"temperature": "x"}, {"num_predict": 1.5}, {"nope": 1}])
        return json.dumps({"id": request_id, "prompt": "hi", "options": options}), request_id
    if kind == 6:
        return json.dumps({"id": request_id, "prompt": "hi", f"field{rng.randrange(100)}": rng.random()}), request_id
    return json.dumps({"id": request_id, "type": rng.choice(["subscribe", "ping", "CANCEL", 7, None, [1]])}), request_id


async def test_each_kind_of_bad_frame_gets_one_error_and_the_connection_keeps_serving(
    vault: RunningServer, log_path: Path
) -> None:
    expected_log: list[tuple[str, str, str | None]] = []
    async with connect(f"{vault.ws_url}/ws/generate") as ws:
        await ws.send('{"type": "cancel"}')  # nothing ever ran: no answer at all
        await answer(ws, "after a cancel before anything ran", "ok-0")
        await ws.send('{"type": "cancel", "id": "c-1"}')  # the last generation has finished: still no answer
        await answer(ws, "after a cancel with nothing running", "ok-1")
        expected_log += [("ok-0", "ok", None), ("ok-1", "ok", None)]
        for index, (what, frame, phrase) in enumerate(BAD_FRAMES):
            error = await refused(ws, frame)
            assert phrase in error["message"], (what, error["message"])
            assert NEW_ID.fullmatch(error["id"])
            await answer(ws, f"after {what}", f"after-{index}")
            expected_log += [(error["id"], "error", "invalid_request"), (f"after-{index}", "ok", None)]
        # An acceptable id in a bad frame names its error (and its log line); a bad id is replaced.
        named = await refused(ws, '{"id": "fuzz-named", "prompt": 5}')
        unnamed = await refused(ws, '{"id": "not an id!", "prompt": 5}')
        await ws.send(b'{"prompt": "binary frames with a JSON object are prompts too", "id": "binary"}')
        assert (await recv(ws))["type"] == "start"
        frames = [await recv(ws)]
        while frames[-1]["type"] != "done":
            frames.append(await recv(ws))
        expected_log += [("fuzz-named", "error", "invalid_request"), (unnamed["id"], "error", "invalid_request"),
                         ("binary", "ok", None)]  # fmt: skip

    assert named["id"] == "fuzz-named"
    assert NEW_ID.fullmatch(unnamed["id"])
    assert frames[-1]["response"] == "binary frames with a JSON object are prompts too"
    vault.stop()
    lines = read_log(log_path)
    assert [(line["id"], line["status"], (line["error"] or {}).get("code")) for line in lines] == expected_log
    assert {line["endpoint"] for line in lines} == {"ws"}


async def test_3000_bad_frames_in_a_burst_get_3000_error_frames_in_order(vault: RunningServer, log_path: Path) -> None:
    rng = random.Random(20261124)
    burst = [burst_frame(rng, index) for index in range(3000)]
    errors: list[dict[str, Any]] = []
    with anyio.fail_after(60):
        async with connect(f"{vault.ws_url}/ws/generate") as ws:

            async def send_all() -> None:
                for frame, _ in burst:
                    await ws.send(frame)

            async def receive_all() -> None:
                for _ in burst:
                    errors.append(await recv(ws))

            # Sending and reading at once: the client's bounded receive queue would otherwise stall the server.
            async with anyio.create_task_group() as group:
                group.start_soon(send_all)
                group.start_soon(receive_all)
            await answer(ws, "still serving after the burst", "after-burst")

    assert len(errors) == 3000
    assert {(error["type"], error["code"]) for error in errors} == {("error", "invalid_request")}
    for (_, request_id), error in zip(burst, errors, strict=True):
        if request_id is None:
            assert NEW_ID.fullmatch(error["id"]), error
        else:
            assert error["id"] == request_id, error
    assert len({error["id"] for error in errors}) == 3000
    vault.stop()
    lines = read_log(log_path)
    assert [(line["id"], line["status"]) for line in lines] == [(e["id"], "error") for e in errors] + [
        ("after-burst", "ok")
    ]
    assert {line["error"]["code"] for line in lines[:-1]} == {"invalid_request"}


async def test_bad_frames_during_a_generation_get_errors_between_its_tokens(
    vault: RunningServer, fake: FakeOllama, log_path: Path
) -> None:
    rng = random.Random(7)
    burst = [burst_frame(rng, index) for index in range(200)]
    async with connect(f"{vault.ws_url}/ws/generate") as ws:
        # "stall" sends two tokens and then nothing: the generation is surely still running meanwhile.
        await ws.send(json.dumps({"prompt": "x", "model": "stall", "id": "running"}))
        assert [(await recv(ws))["type"] for _ in range(3)] == ["start", "token", "token"]
        for frame, _ in burst:
            await ws.send(frame)
        await ws.send(json.dumps({"prompt": "a second prompt", "id": "second"}))
        errors = [await recv(ws) for _ in range(len(burst) + 1)]
        await ws.send(json.dumps({"type": "cancel"}))
        done = await recv(ws)
        fake.wait_until(lambda f: f.disconnects == 1)
        await answer(ws, "served after the cancel", "after")

    assert {(error["type"], error["code"]) for error in errors} == {("error", "invalid_request")}
    assert errors[-1]["id"] == "second"
    assert "a generation is already running on this connection" in errors[-1]["message"]
    assert (done["type"], done["id"], done["done_reason"]) == ("done", "running", "cancelled")
    assert done["response"] == "s0 s1 "
    vault.stop()
    lines = read_log(log_path)
    statuses = [(line["id"], line["status"]) for line in lines]
    # The cancelled answer is logged when it ends, after the refusals that came in meanwhile.
    assert statuses == [(e["id"], "error") for e in errors] + [("running", "cancelled"), ("after", "ok")]


async def test_oversized_frame_closes_1009_and_the_server_serves_a_new_connection(
    vault: RunningServer, log_path: Path
) -> None:
    oversized: list[tuple[str, str | bytes]] = [
        ("text", json.dumps({"prompt": "x" * MAX_BYTES})),
        ("binary", b" " * (MAX_BYTES + 1)),
        # Fewer characters than the limit, more bytes: the limit is in bytes.
        ("multi-byte text", json.dumps({"prompt": "é" * (MAX_BYTES // 2)}, ensure_ascii=False)),
    ]
    closes = []
    for _, frame in oversized:
        async with connect(f"{vault.ws_url}/ws/generate") as ws:
            await ws.send(frame)
            error = await recv(ws)
            with pytest.raises(ConnectionClosed), anyio.fail_after(10):
                await ws.recv()
            closes.append((error["type"], error["code"], ws.close_code, ws.close_reason))
            assert f"the limit is {MAX_BYTES}" in error["message"]
    async with connect(f"{vault.ws_url}/ws/generate") as ws:
        # At the limit exactly, the frame is read: here it is refused for its prompt, and the socket stays open.
        at_limit = '{"prompt": "' + "y" * (MAX_BYTES - 14) + '"}'
        assert len(at_limit.encode()) == MAX_BYTES
        error = await refused(ws, at_limit)
        assert "MINIVAULT_MAX_PROMPT_CHARS" in error["message"]
        await answer(ws, "a new connection is served", "fresh")

    assert closes == [("error", "payload_too_large", 1009, "payload_too_large")] * len(oversized)
    vault.stop()
    lines = read_log(log_path)
    assert [(line["status"], (line["error"] or {}).get("code")) for line in lines] == [
        ("error", "payload_too_large")
    ] * len(oversized) + [("error", "invalid_request"), ("ok", None)]
