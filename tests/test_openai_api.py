"""The OpenAI-compatible API (/v1) through OpenAI's own Python SDK, over the fake Ollama and the embedded engine."""

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.dialect_servers import Gateway, fake_gateway

# Greedy and short: the real model's answers stay quick.
SAMPLING: dict[str, Any] = {"max_tokens": 8, "temperature": 0}
QUESTION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour please"}]
KEY = "k-openai-dialect"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Gateway]:
    """A fresh fake, for the tests that count what reached it."""
    with fake_gateway(tmp_path / "log.jsonl") as gateway:
        yield gateway


@pytest.fixture(params=["shared_fake", "embedded"], ids=["fake", "embedded"])
def gateway(request: pytest.FixtureRequest) -> Gateway:
    return request.getfixturevalue(request.param)


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with gateway.openai_client() as client:
        yield client


@pytest.fixture
def fake_client(fake: Gateway) -> Iterator[openai.OpenAI]:
    with fake.openai_client() as client:
        yield client


def expected_finish(line: dict[str, Any]) -> str:
    return "length" if line["done_reason"] == "length" else "stop"


def test_chat_completion_is_the_logged_answer(gateway: Gateway, client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=gateway.model, messages=QUESTION, **SAMPLING)

    line = gateway.logged(completion.id.removeprefix("chatcmpl-"))
    assert completion.id == f"chatcmpl-{line['id']}"
    assert (line["endpoint"], line["status"], line["backend"]) == ("openai", "ok", gateway.backend)
    assert completion.object == "chat.completion"
    assert completion.model == gateway.model
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == line["response"]
    assert choice.message.content
    assert choice.finish_reason == expected_finish(line)
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (line["prompt_tokens"], line["completion_tokens"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens <= SAMPLING["max_tokens"]
    assert all(type(n) is int for n in (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens))


def test_chat_completion_echoes_the_prompt_on_the_fake(fake: Gateway, fake_client: openai.OpenAI) -> None:
    completion = fake_client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "a b c"}])

    assert completion.choices[0].message.content == "a b c"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 3)


def test_chat_completion_cut_by_max_tokens_finishes_with_length(fake: Gateway, fake_client: openai.OpenAI) -> None:
    completion = fake_client.chat.completions.create(
        model="llama3", messages=[{"role": "user", "content": "one two three four"}], max_tokens=2
    )

    assert completion.choices[0].message.content == "one two "
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2


def test_streamed_chat_joins_to_the_logged_answer(gateway: Gateway, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=gateway.model, messages=QUESTION, stream=True, stream_options={"include_usage": True}, **SAMPLING
    )
    chunks = list(stream)

    *tokens, finish, usage_chunk = chunks
    line = gateway.logged(finish.id.removeprefix("chatcmpl-"))
    assert (line["endpoint"], line["status"]) == ("openai", "ok")
    assert {chunk.id for chunk in chunks} == {f"chatcmpl-{line['id']}"}
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len(tokens) >= 2
    assert tokens[0].choices[0].delta.role == "assistant"
    assert [chunk.choices[0].delta.role for chunk in tokens[1:]] == [None] * (len(tokens) - 1)
    assert [chunk.choices[0].finish_reason for chunk in tokens] == [None] * len(tokens)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in tokens) == line["response"]
    assert finish.choices[0].delta.content is None
    assert finish.choices[0].finish_reason == expected_finish(line)
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == line["prompt_tokens"]
    assert usage_chunk.usage.completion_tokens == line["completion_tokens"]
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_streamed_chat_without_include_usage_has_no_usage_chunk(gateway: Gateway, client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=gateway.model, messages=QUESTION, stream=True, **SAMPLING))

    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in chunks)


def test_streamed_chat_tokens_arrive_while_the_backend_is_still_generating(
    fake: Gateway, fake_client: openai.OpenAI
) -> None:
    assert fake.fake is not None
    # drip: a token every 50 ms, so nine are still to come when the first has arrived.
    with fake_client.chat.completions.create(
        model="drip", messages=[{"role": "user", "content": "go"}], max_tokens=10, stream=True
    ) as stream:
        first = next(stream)
        assert (fake.fake.started, fake.fake.finished) == (1, 0)
        rest = list(stream)

    assert first.choices[0].delta.content == "d0 "
    assert fake.fake.finished == 1
    assert "".join(chunk.choices[0].delta.content or "" for chunk in rest) == "".join(f"d{i} " for i in range(1, 10))
    assert rest[-1].choices[0].finish_reason == "length"


def test_completion_is_the_logged_answer(gateway: Gateway, client: openai.OpenAI) -> None:
    completion = client.completions.create(model=gateway.model, prompt="Once upon a time there", **SAMPLING)

    line = gateway.logged(completion.id.removeprefix("cmpl-"))
    assert completion.id == f"cmpl-{line['id']}"
    assert (line["endpoint"], line["status"], line["prompt"]) == ("openai", "ok", "Once upon a time there")
    assert completion.object == "text_completion"
    [choice] = completion.choices
    assert choice.text == line["response"]
    assert choice.text
    assert choice.finish_reason == expected_finish(line)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        line["prompt_tokens"], line["completion_tokens"],
    )  # fmt: skip


@pytest.mark.anyio
async def test_streamed_completion_through_the_async_client(gateway: Gateway) -> None:
    async with gateway.async_openai_client() as client:
        stream = await client.completions.create(
            model=gateway.model, prompt="Once upon a time there", stream=True,
            stream_options={"include_usage": True}, **SAMPLING,
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]

    *tokens, finish, usage_chunk = chunks
    line = gateway.logged(finish.id.removeprefix("cmpl-"))
    assert {chunk.id for chunk in chunks} == {f"cmpl-{line['id']}"}
    assert {chunk.object for chunk in chunks} == {"text_completion"}
    assert len(tokens) >= 2
    assert "".join(chunk.choices[0].text for chunk in tokens) == line["response"]
    assert finish.choices[0].text == ""
    assert finish.choices[0].finish_reason == expected_finish(line)
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == line["completion_tokens"]


def test_models_are_the_backend_models(gateway: Gateway, client: openai.OpenAI) -> None:
    models = client.models.list().data

    assert [model.id for model in models] == gateway.backend_models()
    assert {(model.object, model.owned_by) for model in models} == {("model", gateway.backend)}
    retrieved = client.models.retrieve(gateway.model)
    assert (retrieved.id, retrieved.object, retrieved.owned_by) == (gateway.model, "model", gateway.backend)


def test_retrieving_an_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model:7b")

    assert caught.value.status_code == 404
    body = caught.value.body
    assert isinstance(body, dict)
    assert (body["type"], body["code"], body["param"]) == ("invalid_request_error", "model_not_found", "model")
    assert "no-such-model:7b" in body["message"]


def test_chat_with_an_unknown_model_raises_not_found(gateway: Gateway, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model:7b", messages=QUESTION, **SAMPLING)

    assert caught.value.status_code == 404
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.request_id is not None
    line = gateway.logged(caught.value.request_id)
    assert (line["status"], line["error"]["code"]) == ("error", "model_not_found")


def test_a_wrong_key_is_refused_and_the_right_one_is_logged(tmp_path: Path) -> None:
    with fake_gateway(tmp_path / "log.jsonl", api_keys=KEY) as gateway:
        with gateway.openai_client(api_key="wrong") as client, pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model=gateway.model, messages=QUESTION)
        with gateway.openai_client(api_key=KEY) as client:
            completion = client.chat.completions.create(model=gateway.model, messages=QUESTION)

        assert caught.value.status_code == 401
        assert isinstance(caught.value.body, dict)
        assert (caught.value.body["type"], caught.value.body["code"]) == ("authentication_error", "unauthorized")
        assert completion.choices[0].message.content == "Name a colour please"
        line = gateway.logged(completion.id.removeprefix("chatcmpl-"))
        assert line["key_id"] == hashlib.sha256(KEY.encode()).hexdigest()[:8]
        assert line["status"] == "ok"


@pytest.mark.parametrize(
    ("param", "value"),
    [("n", 2), ("logprobs", True), ("functions", [{"name": "weather", "parameters": {"type": "object"}}])],
    ids=["n", "logprobs", "functions"],
)
def test_features_that_cannot_be_honoured_are_refused_by_name(
    fake: Gateway, fake_client: openai.OpenAI, param: str, value: Any
) -> None:
    assert fake.fake is not None
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        fake_client.chat.completions.create(model=fake.model, messages=QUESTION, **{param: value})

    assert caught.value.status_code == 422
    body = caught.value.body
    assert isinstance(body, dict)
    assert (body["type"], body["code"], body["param"]) == ("invalid_request_error", "invalid_request", param)
    assert param in body["message"]
    assert fake.fake.requests == []
    assert caught.value.request_id is not None
    line = fake.logged(caught.value.request_id)
    assert (line["endpoint"], line["status"], line["error"]["code"]) == ("openai", "error", "invalid_request")


def test_an_upstream_error_mid_stream_raises_api_error(fake: Gateway, fake_client: openai.OpenAI) -> None:
    received: list[str] = []
    chunk_ids: set[str] = set()
    stream = fake_client.chat.completions.create(
        model="error-line", messages=[{"role": "user", "content": "a b c"}], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
            chunk_ids.add(chunk.id)

    assert received == ["a ", "b "]
    assert not isinstance(caught.value, openai.APIStatusError)  # the status was 200: the stream itself failed
    assert caught.value.body == {
        "message": caught.value.message, "type": "server_error", "code": "backend_error", "param": None,
    }  # fmt: skip
    assert "GGML_ASSERT" in caught.value.message
    [chunk_id] = chunk_ids
    line = fake.logged(chunk_id.removeprefix("chatcmpl-"))
    assert (line["status"], line["error"]["code"], line["response"]) == ("error", "backend_error", "a b ")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_upstream_failure_before_any_token_is_a_502(fake_client: openai.OpenAI, stream: bool) -> None:
    # A stream that fails before its first token is still an HTTP error: the SDK raises on create().
    with pytest.raises(openai.InternalServerError) as caught:
        fake_client.chat.completions.create(
            model="fail-500", messages=[{"role": "user", "content": "hi"}], stream=stream
        )

    assert caught.value.status_code == 502
    assert isinstance(caught.value.body, dict)
    assert (caught.value.body["type"], caught.value.body["code"]) == ("server_error", "backend_error")
    assert "llama runner process has terminated" in caught.value.body["message"]


def test_closing_a_stream_early_stops_the_upstream(fake: Gateway, fake_client: openai.OpenAI) -> None:
    assert fake.fake is not None
    stream = fake_client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "go"}], stream=True
    )
    first = next(stream)
    stream.close()

    fake.fake.wait_until(lambda f: f.disconnects == 1)
    assert fake.fake.finished == 0
    line = fake.logged(first.id.removeprefix("chatcmpl-"))
    assert line["status"] == "cancelled"
    assert line["response"].startswith("w0 ")


def test_sampling_options_reach_the_backend_under_ollama_names(fake: Gateway, fake_client: openai.OpenAI) -> None:
    assert fake.fake is not None
    fake_client.chat.completions.create(
        model="llama3", messages=[{"role": "user", "content": "hi"}],
        temperature=0.25, top_p=0.5, seed=42, stop="END", max_tokens=5,
    )  # fmt: skip
    fake_client.completions.create(model="llama3", prompt="hi", stop=["A", "B"], max_tokens=3, seed=-1)

    chat, completion = fake.fake.requests
    assert chat["options"] == {"temperature": 0.25, "top_p": 0.5, "seed": 42, "stop": ["END"], "num_predict": 5}
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert completion["options"] == {"stop": ["A", "B"], "num_predict": 3, "seed": -1}


def test_an_unknown_route_under_v1_has_openai_shape(fake: Gateway) -> None:
    response = httpx.get(f"{fake.url}/v1/embeddings-nope")

    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "no route GET /v1/embeddings-nope; the API is listed at /docs",
            "type": "invalid_request_error", "code": "not_found", "param": None,
        }
    }  # fmt: skip


def test_an_oversized_body_on_v1_has_openai_shape(tmp_path: Path) -> None:
    with fake_gateway(tmp_path / "log.jsonl", max_body_bytes=256) as gateway:
        body = {"model": "llama3", "messages": [{"role": "user", "content": "x" * 300}]}
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body)

        assert response.status_code == 413
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code", "param"}
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "payload_too_large", None)
        assert "MINIVAULT_MAX_BODY_BYTES" in error["message"]
        line = gateway.logged(response.headers["x-request-id"])
        assert (line["endpoint"], line["status"], line["error"]["code"]) == ("openai", "error", "payload_too_large")
