"""The Ollama-compatible API (/api) through Ollama's own Python client, over the fake Ollama and the embedded engine."""

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from app.dialects.ollama.wire import OLLAMA_API_VERSION
from tests.support.dialect_servers import (
    Gateway,
    RequestIds,
    async_ollama_client,
    fake_gateway,
    ollama_client,
)

# Greedy and short: the real model's answers stay quick.
OPTIONS: dict[str, Any] = {"num_predict": 8, "temperature": 0}
PROMPT = "Name a colour please"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPT}]
KEY = "k-ollama-dialect"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Gateway]:
    """A fresh fake, for the tests that count what reached it."""
    with fake_gateway(tmp_path / "log.jsonl") as gateway:
        yield gateway


@pytest.fixture(params=["shared_fake", "embedded"], ids=["fake", "embedded"])
def gateway(request: pytest.FixtureRequest) -> Gateway:
    return request.getfixturevalue(request.param)


@pytest.fixture
def ids() -> RequestIds:
    return RequestIds()


@pytest.fixture
def client(gateway: Gateway, ids: RequestIds) -> Iterator[ollama.Client]:
    with ollama_client(gateway, ids) as client:
        yield client


@pytest.fixture
def fake_client(fake: Gateway, ids: RequestIds) -> Iterator[ollama.Client]:
    with ollama_client(fake, ids) as client:
        yield client


def assert_final_matches_log(final: ollama.GenerateResponse | ollama.ChatResponse, line: dict[str, Any]) -> None:
    assert (line["endpoint"], line["status"]) == ("ollama", "ok")
    assert final.done is True
    assert final.done_reason == line["done_reason"]
    assert final.done_reason in ("stop", "length")
    assert (final.prompt_eval_count, final.eval_count) == (line["prompt_tokens"], line["completion_tokens"])
    assert 0 < final.eval_count <= OPTIONS["num_predict"]
    assert final.total_duration is not None
    assert final.total_duration > 0


def test_generate_answers_one_object_holding_the_logged_answer(
    gateway: Gateway, client: ollama.Client, ids: RequestIds
) -> None:
    answer = client.generate(model=gateway.model, prompt=PROMPT, system="Answer briefly.", options=OPTIONS)

    line = gateway.logged(ids.last)
    assert_final_matches_log(answer, line)
    assert answer.response == line["response"]
    assert answer.response
    assert answer.model == gateway.model
    assert (line["prompt"], line["system"], line["options"]) == (PROMPT, "Answer briefly.", OPTIONS)


def test_generate_streams_lines_that_join_to_the_logged_answer(
    gateway: Gateway, client: ollama.Client, ids: RequestIds
) -> None:
    *tokens, final = client.generate(model=gateway.model, prompt=PROMPT, options=OPTIONS, stream=True)

    line = gateway.logged(ids.last)
    assert len(tokens) >= 2
    assert [token.done for token in tokens] == [False] * len(tokens)
    assert "".join(token.response for token in tokens) == line["response"]
    assert final.response == ""
    assert_final_matches_log(final, line)


def test_chat_answers_one_message_holding_the_logged_answer(
    gateway: Gateway, client: ollama.Client, ids: RequestIds
) -> None:
    answer = client.chat(model=gateway.model, messages=MESSAGES, options=OPTIONS)

    line = gateway.logged(ids.last)
    assert_final_matches_log(answer, line)
    assert answer.message.role == "assistant"
    assert answer.message.content == line["response"]
    assert answer.message.content


def test_chat_streams_messages_that_join_to_the_logged_answer(
    gateway: Gateway, client: ollama.Client, ids: RequestIds
) -> None:
    *tokens, final = client.chat(model=gateway.model, messages=MESSAGES, options=OPTIONS, stream=True)

    line = gateway.logged(ids.last)
    assert len(tokens) >= 2
    assert {(token.done, token.message.role) for token in tokens} == {(False, "assistant")}
    assert "".join(token.message.content or "" for token in tokens) == line["response"]
    assert final.message.content == ""
    assert_final_matches_log(final, line)


def test_the_fake_answers_are_echoed_exactly(fake: Gateway, fake_client: ollama.Client) -> None:
    generated = fake_client.generate(model="llama3", prompt="one two three")
    chatted = fake_client.chat(model="llama3", messages=[{"role": "user", "content": "four five"}])
    cut = fake_client.generate(model="llama3", prompt="a b c d", options={"num_predict": 2})

    assert (generated.response, generated.done_reason, generated.eval_count) == ("one two three", "stop", 3)
    assert (chatted.message.content, chatted.done_reason, chatted.prompt_eval_count) == ("four five", "stop", 2)
    assert (cut.response, cut.done_reason, cut.eval_count) == ("a b ", "length", 2)


def test_streamed_lines_arrive_while_the_backend_is_still_generating(fake: Gateway, fake_client: ollama.Client) -> None:
    assert fake.fake is not None
    # drip: a token every 50 ms, so nine are still to come when the first has arrived.
    stream = fake_client.generate(model="drip", prompt="go", options={"num_predict": 10}, stream=True)
    first = next(stream)
    assert (fake.fake.started, fake.fake.finished) == (1, 0)
    *rest, final = stream

    assert (first.response, first.done) == ("d0 ", False)
    assert fake.fake.finished == 1
    assert "".join(part.response for part in rest) == "".join(f"d{i} " for i in range(1, 10))
    assert (final.done, final.done_reason, final.eval_count) == (True, "length", 10)


@pytest.mark.anyio
async def test_async_client_streams_chat_while_the_backend_is_still_generating(fake: Gateway, ids: RequestIds) -> None:
    assert fake.fake is not None
    async with async_ollama_client(fake, ids) as client:
        stream = await client.chat(
            model="drip", messages=[{"role": "user", "content": "go"}], options={"num_predict": 10}, stream=True
        )
        first = await anext(stream)
        assert (fake.fake.started, fake.fake.finished) == (1, 0)
        parts = [first] + [part async for part in stream]

    assert parts[-1].done is True
    assert "".join(part.message.content or "" for part in parts) == "".join(f"d{i} " for i in range(10))
    assert fake.logged(ids.last)["response"] == "".join(f"d{i} " for i in range(10))


def test_list_names_the_backend_models(gateway: Gateway, client: ollama.Client) -> None:
    listed = client.list().models

    assert [model.model for model in listed] == gateway.backend_models()
    assert all(model.size is not None and model.size > 0 for model in listed)


def test_show_is_passed_through_to_ollama(fake: Gateway, fake_client: ollama.Client) -> None:
    shown = fake_client.show("llama3:latest")

    assert shown.modelfile == "FROM llama3:latest"
    assert shown.template == "{{ .Prompt }}"
    assert shown.details is not None
    assert shown.details.family == "fake"


def test_show_is_synthesized_on_the_embedded_engine(embedded: Gateway) -> None:
    with ollama_client(embedded) as client:
        shown = client.show(embedded.model)
    raw = httpx.post(f"{embedded.url}/api/show", json={"model": embedded.model}).json()

    assert (shown.modelfile, shown.template, shown.capabilities) == ("", "", ["completion", "tools"])
    assert shown.details is not None
    assert raw["details"]["file"] == f"{embedded.model}.gguf"  # the file's name, not its path


def test_ps_lists_the_loaded_models(gateway: Gateway, client: ollama.Client) -> None:
    loaded = client.ps().models

    # The fake reports its first model loaded, with VRAM; the embedded engine its one model, in RAM.
    expected = (gateway.backend_models()[0], 1000 if gateway.fake is not None else 0)
    assert [(model.model, model.size_vram) for model in loaded] == [expected]


def test_version_is_ollamas_or_the_api_minivault_follows(gateway: Gateway) -> None:
    response = httpx.get(f"{gateway.url}/api/version")

    assert response.status_code == 200
    assert response.json() == {"version": "0.0.0-fake" if gateway.fake is not None else OLLAMA_API_VERSION}


MISSING_MODEL_CALLS: dict[str, Callable[[ollama.Client], object]] = {
    "generate": lambda client: client.generate(model="no-such-model:7b", prompt=PROMPT),
    "generate-stream": lambda client: list(client.generate(model="no-such-model:7b", prompt=PROMPT, stream=True)),
    "chat": lambda client: client.chat(model="no-such-model:7b", messages=MESSAGES),
    "show": lambda client: client.show("no-such-model:7b"),
    "load": lambda client: client.generate(model="no-such-model:7b"),
    "load-chat": lambda client: client.chat(model="no-such-model:7b", messages=[]),
}


@pytest.mark.parametrize("call", MISSING_MODEL_CALLS)
def test_a_missing_model_is_404(client: ollama.Client, call: str) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        MISSING_MODEL_CALLS[call](client)

    assert caught.value.status_code == 404
    assert "no-such-model:7b" in caught.value.error


def test_the_key_is_required_and_its_id_logged(tmp_path: Path) -> None:
    with fake_gateway(tmp_path / "log.jsonl", api_keys=KEY) as gateway:
        ids = RequestIds()
        with ollama_client(gateway) as anonymous, pytest.raises(ollama.ResponseError) as caught:
            anonymous.generate(model="llama3", prompt=PROMPT)
        with ollama_client(gateway, ids, headers={"Authorization": f"Bearer {KEY}"}) as client:
            answer = client.generate(model="llama3", prompt=PROMPT)

        assert caught.value.status_code == 401
        assert caught.value.error.startswith("an API key is required")
        assert answer.response == PROMPT
        line = gateway.logged(ids.last)
        assert (line["key_id"], line["status"]) == (hashlib.sha256(KEY.encode()).hexdigest()[:8], "ok")


def test_a_request_without_a_prompt_loads_the_model(gateway: Gateway, client: ollama.Client) -> None:
    loads = gateway.fake.loads if gateway.fake is not None else 0
    generated = client.generate(model=gateway.model)
    chatted = client.chat(model=gateway.model)

    assert (generated.done, generated.done_reason, generated.response) == (True, "load", "")
    assert (chatted.done, chatted.done_reason, chatted.message.content) == (True, "load", "")
    if gateway.fake is not None:
        # Both went on to Ollama as its own load requests (the embedded engine has its model loaded already).
        assert gateway.fake.loads == loads + 2


def test_pull_streams_progress_and_delete_removes_the_model(fake: Gateway, fake_client: ollama.Client) -> None:
    assert fake.fake is not None
    statuses = [progress.status for progress in fake_client.pull("phi3:mini", stream=True)]

    assert statuses[0] == "pulling manifest"
    assert statuses[-1] == "success"
    assert "phi3:mini" in fake.fake.models
    assert fake_client.delete("phi3:mini").status == "success"
    assert "phi3:mini" not in fake.fake.models
    with pytest.raises(ollama.ResponseError) as caught:
        fake_client.delete("phi3:mini")
    assert caught.value.status_code == 404


def test_model_management_is_not_implemented_on_the_embedded_engine(embedded: Gateway) -> None:
    with ollama_client(embedded) as client:
        with pytest.raises(ollama.ResponseError) as pulled:
            client.pull("phi3:mini")
        with pytest.raises(ollama.ResponseError) as deleted:
            client.delete(embedded.model)

    assert (pulled.value.status_code, deleted.value.status_code) == (501, 501)
    assert pulled.value.error.startswith("POST /api/pull manages Ollama's own models")
    assert deleted.value.error.startswith("DELETE /api/delete manages Ollama's own models")


def test_an_invalid_option_is_400_naming_the_field(fake: Gateway) -> None:
    body = {"model": "llama3", "prompt": PROMPT, "options": {"temperature": "hot"}}
    response = httpx.post(f"{fake.url}/api/generate", json=body)

    assert response.status_code == 400
    assert list(response.json()) == ["error"]
    assert "temperature" in response.json()["error"]
    line = fake.logged(response.headers["x-request-id"])
    assert (line["endpoint"], line["status"], line["error"]["code"]) == ("ollama", "error", "invalid_request")


def test_an_image_that_is_not_one_is_refused_with_400(
    fake: Gateway, fake_client: ollama.Client, ids: RequestIds
) -> None:
    assert fake.fake is not None
    with pytest.raises(ollama.ResponseError) as caught:
        fake_client.generate(model="llama3", prompt="What is this?", images=[b"\x89PNG\r\n"])

    assert caught.value.status_code == 400
    assert caught.value.error == "images[0]: not a PNG, JPEG, WEBP, GIF image by its bytes"
    assert fake.fake.requests == []
    line = fake.logged(ids.last)
    assert (line["status"], line["model"], line["prompt"], line["error"]["code"]) == (
        "error", "llama3", "What is this?", "invalid_request",
    )  # fmt: skip


def test_an_upstream_error_mid_stream_raises_response_error(fake: Gateway, fake_client: ollama.Client) -> None:
    received: list[str] = []
    with pytest.raises(ollama.ResponseError) as caught:
        for part in fake_client.generate(model="error-line", prompt="a b c", stream=True):
            received.append(part.response)

    assert received == ["a ", "b "]
    assert "GGML_ASSERT" in caught.value.error


def test_an_unknown_route_under_api_has_ollamas_shape(fake: Gateway) -> None:
    response = httpx.get(f"{fake.url}/api/nope")

    assert response.status_code == 404
    assert response.json() == {"error": "no route GET /api/nope; the API is listed at /docs"}


def test_an_oversized_body_on_api_chat_has_ollamas_shape(tmp_path: Path) -> None:
    with fake_gateway(tmp_path / "log.jsonl", max_body_bytes=256) as gateway:
        body = {"model": "llama3", "messages": [{"role": "user", "content": "x" * 300}]}
        response = httpx.post(f"{gateway.url}/api/chat", json=body)

        assert response.status_code == 413
        assert list(response.json()) == ["error"]
        assert "MINIVAULT_MAX_BODY_BYTES" in response.json()["error"]
        line = gateway.logged(response.headers["x-request-id"])
        assert (line["endpoint"], line["status"], line["error"]["code"]) == ("ollama", "error", "payload_too_large")
