"""MiniVault's own dialect beyond text: `format`, `images` and `think` on POST /generate (JSON and SSE) and on
WS /ws/generate, through the fake Ollama; the thinking in the body, the events and the frames; bad input refused
as 422 in MiniVault's shape, naming the field, logged, and never sent upstream."""

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import pytest
from websockets.sync.client import connect

from tests.support.dialect_servers import Gateway, fake_gateway
from tests.support.sse import parse_events

THINKER, SEER = "thinker:latest", "seer:latest"
# A 1x1 PNG: 70 bytes.
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
PIXEL_BYTES = len(base64.b64decode(PIXEL))
MAX_IMAGE_BYTES = 1024
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["colour", "count"],
}


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One MiniVault over one fake whose `thinker` thinks and `seer` sees (the default model does neither)."""
    with fake_gateway(tmp_path_factory.mktemp("features") / "log.jsonl", max_image_bytes=MAX_IMAGE_BYTES) as gateway:
        assert gateway.fake is not None
        gateway.fake.add_model(THINKER, ["completion", "thinking"])
        gateway.fake.add_model(SEER, ["completion", "vision"])
        yield gateway


@pytest.fixture
def fake(vault: Gateway) -> Any:
    assert vault.fake is not None
    return vault.fake


def post(vault: Gateway, body: dict[str, Any], request_id: str) -> httpx.Response:
    return httpx.post(f"{vault.url}/generate", json=body, headers={"X-Request-ID": request_id}, timeout=30)


def sse(vault: Gateway, body: dict[str, Any]) -> list[tuple[str, Any]]:
    with httpx.stream("POST", f"{vault.url}/generate", json={**body, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        return list(parse_events(response.iter_lines()))


def ws_frames(vault: Gateway, frame: dict[str, Any]) -> list[dict[str, Any]]:
    with connect(f"{vault.server.ws_url}/ws/generate") as ws:
        ws.send(json.dumps(frame))
        frames = [json.loads(ws.recv())]
        while frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(ws.recv()))
    return frames


def test_the_rest_answer_carries_the_thinking(vault: Gateway, fake: Any) -> None:
    answer = post(vault, {"prompt": "is 97 prime", "model": THINKER, "think": "low"}, "think-rest")

    assert answer.status_code == 200
    body = answer.json()
    assert (body["response"], body["thinking"]) == ("is 97 prime", "Thinking (low) about: is 97 prime")
    assert fake.last_request["/api/generate"]["think"] == "low"
    line = vault.logged("think-rest")
    assert (line["endpoint"], line["status"]) == ("rest", "ok")


def test_a_plain_answer_has_no_thinking_field(vault: Gateway, fake: Any) -> None:
    answer = post(vault, {"prompt": "hello there"}, "plain-rest")

    assert answer.status_code == 200
    assert "thinking" not in answer.json()
    assert "think" not in fake.last_request["/api/generate"]


def test_think_false_reaches_ollama_and_the_answer_has_no_thinking(vault: Gateway, fake: Any) -> None:
    answer = post(vault, {"prompt": "quick one", "model": THINKER, "think": False}, "think-off")

    assert answer.status_code == 200
    assert "thinking" not in answer.json()
    assert fake.last_request["/api/generate"]["think"] is False


def test_sse_streams_thinking_events_before_the_tokens(vault: Gateway) -> None:
    events = sse(vault, {"prompt": "why is the sky blue", "model": THINKER, "think": True})

    kinds = [kind for kind, _ in events]
    thinking = [data["content"] for kind, data in events if kind == "thinking"]
    tokens = [data["content"] for kind, data in events if kind == "token"]
    assert "".join(thinking) == "Thinking (medium) about: why is the sky blue"
    assert len(thinking) == 8
    assert "".join(tokens) == "why is the sky blue"
    assert kinds == ["thinking"] * len(thinking) + ["token"] * len(tokens) + ["done"]
    done = events[-1][1]
    assert (done["thinking"], done["response"]) == ("".join(thinking), "why is the sky blue")


def test_the_websocket_streams_thinking_frames(vault: Gateway) -> None:
    frames = ws_frames(vault, {"prompt": "count to three", "model": THINKER, "think": "high"})

    kinds = [frame["type"] for frame in frames]
    thinking = "".join(frame["content"] for frame in frames if frame["type"] == "thinking")
    assert thinking == "Thinking (high) about: count to three"
    assert kinds == ["start"] + ["thinking"] * 6 + ["token"] * 3 + ["done"]
    assert (frames[-1]["thinking"], frames[-1]["response"]) == (thinking, "count to three")


def test_a_json_schema_format_reaches_ollama_and_the_answer_matches_it(vault: Gateway, fake: Any) -> None:
    answer = post(vault, {"prompt": "name a colour", "format": SCHEMA}, "format-schema")

    assert answer.status_code == 200
    assert fake.last_request["/api/generate"]["format"] == SCHEMA
    instance = json.loads(answer.json()["response"])
    jsonschema_rs.validate(SCHEMA, instance)
    assert vault.logged("format-schema")["status"] == "ok"


def test_format_json_reaches_ollama(vault: Gateway, fake: Any) -> None:
    answer = post(vault, {"prompt": "say hi", "format": "json"}, "format-json")

    assert answer.status_code == 200
    assert fake.last_request["/api/generate"]["format"] == "json"
    assert json.loads(answer.json()["response"]) == {"answer": "say hi"}


def test_images_reach_ollama_as_base64(vault: Gateway, fake: Any) -> None:
    answer = post(vault, {"prompt": "what is this", "model": SEER, "images": [PIXEL, PIXEL]}, "images")

    assert answer.status_code == 200
    assert answer.json()["response"] == f"I see 2 image(s): {PIXEL_BYTES}, {PIXEL_BYTES} bytes. what is this"
    assert fake.last_request["/api/generate"]["images"] == [PIXEL, PIXEL]


def test_images_and_thinking_go_over_the_websocket(vault: Gateway, fake: Any) -> None:
    frames = ws_frames(vault, {"prompt": "look", "model": SEER, "images": [PIXEL]})

    assert frames[-1]["type"] == "done"
    assert frames[-1]["response"] == f"I see 1 image(s): {PIXEL_BYTES} bytes. look"
    assert fake.last_request["/api/generate"]["images"] == [PIXEL]


def test_a_conversation_sends_the_prompts_asks_with_it_and_keeps_text_turns(vault: Gateway, fake: Any) -> None:
    first = post(vault, {"prompt": "look here", "model": SEER, "images": [PIXEL], "conversation_id": "c-img"}, "c1")
    second = post(vault, {"prompt": "and now", "model": SEER, "format": "json", "conversation_id": "c-img"}, "c2")

    assert (first.status_code, second.status_code) == (200, 200)
    chat = fake.last_request["/api/chat"]
    assert chat["format"] == "json"
    # The earlier turn is text: its image went with its own prompt only.
    assert [(m["role"], m.get("images")) for m in chat["messages"]] == [
        ("user", None), ("assistant", None), ("user", None)
    ]  # fmt: skip
    assert chat["messages"][0]["content"] == "look here"
    assert first.json()["response"] == f"I see 1 image(s): {PIXEL_BYTES} bytes. look here"
    assert json.loads(second.json()["response"]) == {"answer": "and now"}


def test_a_conversation_prompt_with_thinking_reaches_ollama(vault: Gateway, fake: Any) -> None:
    answer = post(vault, {"prompt": "think it over", "model": THINKER, "think": True, "conversation_id": "c-th"}, "c3")

    assert answer.status_code == 200
    assert answer.json()["thinking"] == "Thinking (medium) about: think it over"
    assert fake.last_request["/api/chat"]["think"] is True


TOO_BIG = base64.b64encode(base64.b64decode(PIXEL) + b"\0" * MAX_IMAGE_BYTES).decode()
BAD_INPUTS = {
    "not-base64": ({"images": ["not base64!"]}, "images[0]: not valid base64"),
    "not-an-image": ({"images": [base64.b64encode(b"hello world").decode()]}, "images[0]: not a PNG, JPEG"),
    "too-large": ({"images": [PIXEL, TOO_BIG]}, "images[1]: the image is about"),
    "image-not-a-string": ({"images": [5]}, "images.0: Input should be a valid string"),
    "format-word": ({"format": "xml"}, 'format: must be "json" or a JSON schema object'),
    "format-bad-schema": ({"format": {"type": 5}}, "format.type: not a valid JSON schema"),
    "think-level": ({"think": "max"}, 'think: must be true, false, "low", "medium" or "high"'),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]},
              "tools: /generate takes no tools; send them to /api/chat or /v1/chat/completions"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_422_naming_the_field_logged_and_never_sent(vault: Gateway, fake: Any, case: str) -> None:
    extra, message = BAD_INPUTS[case]
    sent = len(fake.received)
    request_id = f"bad-{case}"

    answer = post(vault, {"prompt": "hi", "model": SEER, **extra}, request_id)

    assert answer.status_code == 422
    error = answer.json()["error"]
    assert (error["code"], error["id"]) == ("invalid_request", request_id)
    assert error["message"].startswith(message), error["message"]
    line = vault.logged(request_id)
    assert (line["status"], line["error"]["code"], line["prompt"]) == ("error", "invalid_request", "hi")
    assert len(fake.received) == sent


def test_an_oversized_image_names_the_setting(vault: Gateway) -> None:
    answer = post(vault, {"prompt": "hi", "images": [TOO_BIG]}, "too-big")

    assert answer.status_code == 422
    assert answer.json()["error"]["message"].endswith(f"the limit is {MAX_IMAGE_BYTES} (MINIVAULT_MAX_IMAGE_BYTES)")


def test_a_bad_image_on_the_websocket_is_an_error_frame_and_never_sent(vault: Gateway, fake: Any) -> None:
    sent = len(fake.received)

    [frame] = ws_frames(vault, {"prompt": "hi", "images": ["@@@@"], "id": "ws-bad-image"})

    assert (frame["type"], frame["code"], frame["id"]) == ("error", "invalid_request", "ws-bad-image")
    assert frame["message"].startswith("images[0]: not valid base64")
    assert vault.logged("ws-bad-image")["status"] == "error"
    assert len(fake.received) == sent


def test_thinking_on_a_model_without_it_is_refused_naming_thinking(vault: Gateway) -> None:
    answer = post(vault, {"prompt": "hi", "think": True}, "no-thinking")

    assert answer.status_code == 400  # a valid body the model cannot answer: 400 on every API, as Ollama says it
    assert "does not support thinking" in answer.json()["error"]["message"]
    assert vault.logged("no-thinking")["status"] == "error"
