"""The key clients send to a MiniVault with MINIVAULT_API_KEYS set: ollama-python's Client (and so langchain-ollama's
ChatOllama, llm-ollama and oterm, built on it) takes it from OLLAMA_API_KEY; ChatOpenAI from `api_key=`."""

import hashlib
from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tests.support.dialect_servers import Gateway, fake_gateway
from tests.support.fake_ollama import FakeOllama

KEY = "mv-client-key-Rb8sLq"
WRONG = "mv-wrong-key-Xn3dVe"
MODEL = "llama3"
MISSING = (
    "an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>` (websocket: either header, "
    "or the `api_key` query parameter)"
)
INVALID = (
    "the API key is not valid: check it against MINIVAULT_API_KEYS and MINIVAULT_ADMIN_KEYS (sent as "
    "`Authorization: Bearer <key>` or `X-API-Key: <key>`)"
)


class Seen:
    """An httpx hook keeping the Authorization header and MiniVault's request id of each exchange."""

    def __init__(self) -> None:
        self.authorization: list[str | None] = []
        self.ids: list[str] = []

    def __call__(self, response: httpx.Response) -> None:
        self.authorization.append(response.request.headers.get("authorization"))
        self.ids.append(response.headers["x-request-id"])


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A key in the developer's shell would make the "without it" cases pass for the wrong reason.
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    monkeypatch.setenv("LANGCHAIN_TRACING_V2", "false")
    monkeypatch.setenv("LANGSMITH_TRACING", "false")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with fake_gateway(tmp_path_factory.mktemp("keys") / "log.jsonl", api_keys=KEY) as gateway:
        yield gateway


@pytest.fixture
def fake(gateway: Gateway) -> FakeOllama:
    assert gateway.fake is not None
    return gateway.fake


@pytest.fixture
def seen() -> Seen:
    return Seen()


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def chat_ollama(gateway: Gateway, seen: Seen) -> ChatOllama:
    options = {"timeout": 30, "event_hooks": {"response": [seen]}}
    return ChatOllama(model=MODEL, base_url=gateway.url, client_kwargs=options)


def chat_openai(gateway: Gateway, api_key: str, http_client: httpx.Client) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=f"{gateway.url}/v1", api_key=SecretStr(api_key), max_retries=0, timeout=30,
                      http_client=http_client)  # fmt: skip


# --- ollama-python ---------------------------------------------------------------------------------------------


def test_the_ollama_client_sends_the_key_from_ollama_api_key(
    monkeypatch: pytest.MonkeyPatch, gateway: Gateway, fake: FakeOllama, seen: Seen
) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    before = len(fake.requests)

    with ollama.Client(host=gateway.url, timeout=30, event_hooks={"response": [seen]}) as client:
        answer = client.chat(model=MODEL, messages=ask("hello there"))

    assert (answer.message.content, answer.done_reason) == ("hello there", "stop")
    assert seen.authorization == [f"Bearer {KEY}"]
    assert len(fake.requests) == before + 1
    line = gateway.logged(seen.ids[0])
    assert (line["status"], line["key_id"]) == ("ok", key_id(KEY))


def test_the_ollama_client_without_ollama_api_key_is_401(gateway: Gateway, fake: FakeOllama, seen: Seen) -> None:
    before = len(fake.requests)

    with ollama.Client(host=gateway.url, timeout=30, event_hooks={"response": [seen]}) as client:
        with pytest.raises(ollama.ResponseError) as refused:
            client.chat(model=MODEL, messages=ask("hello there"))

    assert (refused.value.status_code, refused.value.error) == (401, MISSING)
    assert seen.authorization == [None]
    assert len(fake.requests) == before  # refused before it reached Ollama


def test_the_ollama_client_with_a_wrong_ollama_api_key_is_401(
    monkeypatch: pytest.MonkeyPatch, gateway: Gateway, fake: FakeOllama, seen: Seen
) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", WRONG)
    before = len(fake.requests)

    with ollama.Client(host=gateway.url, timeout=30, event_hooks={"response": [seen]}) as client:
        with pytest.raises(ollama.ResponseError) as refused:
            client.chat(model=MODEL, messages=ask("hello there"))

    assert (refused.value.status_code, refused.value.error) == (401, INVALID)
    assert seen.authorization == [f"Bearer {WRONG}"]
    assert len(fake.requests) == before


# --- langchain-ollama ------------------------------------------------------------------------------------------


def test_chat_ollama_answers_with_ollama_api_key_set(
    monkeypatch: pytest.MonkeyPatch, gateway: Gateway, seen: Seen
) -> None:
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    model = chat_ollama(gateway, seen)
    try:
        answer = model.invoke("hello there")
    finally:
        model._client.close()  # ChatOllama never closes the client it builds

    assert isinstance(answer, AIMessage)
    assert (answer.content, answer.response_metadata["done_reason"]) == ("hello there", "stop")
    assert seen.authorization == [f"Bearer {KEY}"]
    assert gateway.logged(seen.ids[0])["key_id"] == key_id(KEY)


def test_chat_ollama_without_ollama_api_key_raises_401(gateway: Gateway, fake: FakeOllama, seen: Seen) -> None:
    before = len(fake.requests)
    model = chat_ollama(gateway, seen)
    try:
        with pytest.raises(ollama.ResponseError) as refused:
            model.invoke("hello there")
    finally:
        model._client.close()

    assert (refused.value.status_code, refused.value.error) == (401, MISSING)
    assert seen.authorization == [None]
    assert len(fake.requests) == before


# --- langchain-openai ------------------------------------------------------------------------------------------


def test_chat_openai_answers_with_the_key(gateway: Gateway, seen: Seen) -> None:
    with httpx.Client(event_hooks={"response": [seen]}) as http_client:
        answer = chat_openai(gateway, KEY, http_client).invoke("hello there")

    assert isinstance(answer, AIMessage)
    assert (answer.content, answer.response_metadata["finish_reason"]) == ("hello there", "stop")
    assert seen.authorization == [f"Bearer {KEY}"]
    assert gateway.logged(seen.ids[0])["key_id"] == key_id(KEY)


def test_chat_openai_with_a_wrong_key_is_401(gateway: Gateway, fake: FakeOllama, seen: Seen) -> None:
    before = len(fake.requests)

    with httpx.Client(event_hooks={"response": [seen]}) as http_client:
        with pytest.raises(openai.AuthenticationError) as refused:
            chat_openai(gateway, WRONG, http_client).invoke("hello there")

    assert (refused.value.status_code, refused.value.code) == (401, "unauthorized")
    assert refused.value.body == {"message": INVALID, "type": "authentication_error", "code": "unauthorized",
                                  "param": None}  # fmt: skip
    assert seen.authorization == [f"Bearer {WRONG}"]
    assert len(fake.requests) == before
