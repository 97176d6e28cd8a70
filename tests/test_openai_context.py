"""A chat longer than the model's context, through /v1 with OpenAI's SDK over MINIVAULT_BACKEND=openai.

The fake OpenAI-compatible server says its context as llama-server (`/props`) or vLLM (`max_model_len`) does,
counts tokens at its `/tokenize`, and refuses a prompt too long as they do; each test reads what reached it.
"""

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.fake_openai import FakeOpenAI, OpenAIGateway, openai_gateway

LONG = "word " * 80
# 2 + 3 * 80 + 2 + 2 words and 4 per message and 3 per prompt: 273 tokens, more than the fake's 256.
CONVERSATION: list[Any] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": LONG},
    {"role": "assistant", "content": LONG},
    {"role": "user", "content": LONG},
    {"role": "assistant", "content": "short answer"},
    {"role": "user", "content": "And now?"},
]


@pytest.fixture
def fake() -> FakeOpenAI:
    upstream = FakeOpenAI()
    upstream.context = 256
    return upstream


@pytest.fixture
def gateway(tmp_path: Path, fake: FakeOpenAI) -> Iterator[OpenAIGateway]:
    with openai_gateway(tmp_path / "log.jsonl", fake) as running:
        yield running


@pytest.fixture
def sdk(gateway: OpenAIGateway) -> Iterator[openai.OpenAI]:
    with gateway.openai_client() as client:
        yield client


def upstream_url(gateway: OpenAIGateway) -> str:
    url: str = gateway.app.state.backend.url
    return url


def test_the_fake_refuses_the_whole_conversation_as_llama_server_does(gateway: OpenAIGateway) -> None:
    body = {"model": gateway.model, "messages": CONVERSATION, "stream": True}
    refused = httpx.post(f"{upstream_url(gateway)}/v1/chat/completions", json=body, timeout=30)
    assert refused.status_code == 400
    assert refused.json()["error"]["type"] == "exceed_context_size_error"
    assert refused.json()["error"]["n_prompt_tokens"] == 273


def test_a_long_conversation_keeps_the_system_prompt_and_the_newest_messages(
    gateway: OpenAIGateway, fake: FakeOpenAI, sdk: openai.OpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    start = len(fake.paths)
    with caplog.at_level(logging.INFO, "app.backends.openai_compat"):
        answer = sdk.chat.completions.create(model=gateway.model, messages=CONVERSATION)

    assert answer.choices[0].message.content == "And now?"
    # 256 - 64 for the answer - 16 for the template leaves 176: the system prompt (2 + 8), the newest two (2 + 8
    # each) and one long turn (80 + 8) fit; the next long one does not, and the oldest two go.
    sent = fake.requests("/v1/chat/completions")[-1]["messages"]
    assert [m["content"] for m in sent] == ["Be brief.", LONG, "short answer", "And now?"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert gateway.logged(answer.id.removeprefix("chatcmpl-"))["dropped_messages"] == 2
    message = f"openai: dropped the 2 oldest of 6 messages to fit the 256-token context of model '{gateway.model}'"
    assert message in caplog.messages
    # Counted newest first (after the system prompt), and not past the first message that did not fit.
    counted = [body["content"] for body in fake.requests("/tokenize")]
    assert counted == ["Be brief.", "And now?", "short answer", LONG, LONG]
    assert fake.paths[start:] == [("GET", "/props")] + [("POST", "/tokenize")] * 5 + [("POST", "/v1/chat/completions")]


def test_a_short_chat_costs_no_call_before_or_after_the_context_is_known(
    gateway: OpenAIGateway, fake: FakeOpenAI, sdk: openai.OpenAI
) -> None:
    start = len(fake.paths)
    first = sdk.chat.completions.create(model=gateway.model, messages=[{"role": "user", "content": "Hi"}])
    sdk.chat.completions.create(model=gateway.model, messages=CONVERSATION)
    middle = len(fake.paths)
    again = sdk.chat.completions.create(model=gateway.model, messages=[{"role": "user", "content": "Yo"}])

    assert (first.choices[0].message.content, again.choices[0].message.content) == ("Hi", "Yo")
    chat = ("POST", "/v1/chat/completions")
    # Short enough for any context: the first goes straight to the server; the long one learns the context.
    assert fake.paths[start : start + 3] == [chat, ("GET", "/props"), ("POST", "/tokenize")]
    assert fake.paths[middle:] == [chat]
    assert fake.requests("/v1/chat/completions")[-1]["messages"] == [{"role": "user", "content": "Yo"}]
    assert gateway.logged(again.id.removeprefix("chatcmpl-"))["dropped_messages"] is None


def test_a_single_message_that_cannot_fit_is_refused_before_the_server(
    gateway: OpenAIGateway, fake: FakeOpenAI, sdk: openai.OpenAI
) -> None:
    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 300}]
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(model=gateway.model, messages=messages)

    assert raised.value.status_code == 400
    error: Any = raised.value.body
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")
    assert error["message"].startswith(
        "messages: the conversation's newest message needs 318 tokens with its system prompt, but the 256-token "
        f"context of model '{gateway.model}' on "
    )
    assert "leaves 240; it cannot fit" in error["message"]
    assert fake.requests("/v1/chat/completions") == []


def test_a_newest_message_that_fits_only_without_the_answers_room_goes_alone(
    gateway: OpenAIGateway, fake: FakeOpenAI, sdk: openai.OpenAI
) -> None:
    # 200 + 8 is more than the 176 left with room for the answer, but within the 240 the context holds.
    messages: Any = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "word " * 200},
    ]
    answer = sdk.chat.completions.create(model=gateway.model, messages=messages)

    assert answer.choices[0].message.content == "word " * 200
    assert fake.requests("/v1/chat/completions")[-1]["messages"] == [messages[-1]]
    assert gateway.logged(answer.id.removeprefix("chatcmpl-"))["dropped_messages"] == 2


def test_vllm_says_its_context_in_v1_models_and_counts_at_its_tokenize(tmp_path: Path) -> None:
    fake = FakeOpenAI()
    fake.context, fake.context_source = 256, "models"
    with openai_gateway(tmp_path / "log.jsonl", fake) as gateway, gateway.openai_client() as sdk:
        body = {"model": gateway.model, "messages": CONVERSATION, "max_tokens": 64, "stream": True}
        refused = httpx.post(f"{upstream_url(gateway)}/v1/chat/completions", json=body, timeout=30)
        start = len(fake.paths)
        answer = sdk.chat.completions.create(model=gateway.model, messages=CONVERSATION, max_tokens=64)

    assert refused.status_code == 400
    assert "maximum context length is 256 tokens" in refused.json()["error"]["message"]
    sent = fake.requests("/v1/chat/completions")[-1]
    assert [m["content"] for m in sent["messages"]] == ["Be brief.", LONG, "short answer", "And now?"]
    assert sent["max_tokens"] == 64
    assert gateway.logged(answer.id.removeprefix("chatcmpl-"))["dropped_messages"] == 2
    counted = fake.requests("/tokenize")
    assert counted[0] == {"model": gateway.model, "prompt": "Be brief.", "add_special_tokens": False}
    assert [body["prompt"] for body in counted] == ["Be brief.", "And now?", "short answer", LONG, LONG]
    assert fake.paths[start:start + 2] == [("GET", "/props"), ("GET", "/v1/models")]  # fmt: skip
    assert fake.paths[-1] == ("POST", "/v1/chat/completions")


def test_a_server_that_does_not_say_its_context_gets_the_conversation_unchanged(tmp_path: Path) -> None:
    fake = FakeOpenAI()  # no `context`: no /props, no max_model_len, no /tokenize
    with openai_gateway(tmp_path / "log.jsonl", fake) as gateway, gateway.openai_client() as sdk:
        start = len(fake.paths)
        first = sdk.chat.completions.create(model=gateway.model, messages=CONVERSATION)
        again = sdk.chat.completions.create(model=gateway.model, messages=CONVERSATION)

    assert (first.choices[0].message.content, again.choices[0].message.content) == ("And now?", "And now?")
    assert [body["messages"] for body in fake.requests("/v1/chat/completions")] == [CONVERSATION, CONVERSATION]
    chat = ("POST", "/v1/chat/completions")
    # Asked once: that the server does not say is remembered too.
    assert fake.paths[start:] == [("GET", "/props"), ("GET", "/v1/models"), chat, chat]
    assert gateway.logged(again.id.removeprefix("chatcmpl-"))["dropped_messages"] is None
