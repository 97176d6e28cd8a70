"""Honest capabilities: what /api/show, /api/tags, /api/ps, /v1/models and /models say of each model (on the
embedded engine, through Ollama, through a pool of Ollama hosts), and the pool sending a prompt that needs a
capability only to the hosts whose model has it."""

import asyncio
from collections.abc import AsyncGenerator, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from app.backends import ChatInput, Completion, HostPool, ModelInfo
from app.errors import BackendUnavailable, InvalidRequest
from app.main import create_app
from app.vocabulary import Image, Message, Tool
from tests.conftest import make_settings
from tests.support.dialect_servers import Gateway, fake_gateway, wait_started
from tests.support.fake_ollama import MODIFIED_AT, FakeOllama
from tests.support.servers import RunningServer, serve_in_thread

SEER, BLIND = "seer:latest", "blind:latest"
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
PS_FIELDS = {"name", "model", "size", "digest", "details", "expires_at", "size_vram", "context_length"}


def moment(text: str) -> datetime:
    """An RFC 3339 time as Ollama's clients read it; fails on a time without its offset."""
    parsed = datetime.fromisoformat(text)
    assert parsed.tzinfo is not None, text
    return parsed


# --- the embedded engine ---------------------------------------------------------------------------


def gguf_mtime(embedded: Gateway) -> float:
    return embedded.app.state.backend.engine.model_path.stat().st_mtime


def test_show_on_the_embedded_engine_reports_its_capabilities_and_the_files_time(embedded: Gateway) -> None:
    with ollama.Client(host=embedded.url, timeout=30) as client:
        shown = client.show(embedded.model)

    assert shown.capabilities == ["completion", "tools"]
    assert shown.modified_at is not None
    assert shown.modified_at.timestamp() == pytest.approx(gguf_mtime(embedded), abs=1)


def test_tags_on_the_embedded_engine_carry_the_files_time(embedded: Gateway) -> None:
    [model] = httpx.get(f"{embedded.url}/api/tags").json()["models"]

    assert model["name"] == embedded.model
    assert moment(model["modified_at"]).timestamp() == pytest.approx(gguf_mtime(embedded), abs=1)


def test_ps_on_the_embedded_engine_has_ollamas_fields_and_stays_loaded(embedded: Gateway) -> None:
    response = httpx.get(f"{embedded.url}/api/ps")
    with ollama.Client(host=embedded.url, timeout=30) as client:
        [loaded] = client.ps().models

    [raw] = response.json()["models"]
    assert set(raw) == PS_FIELDS
    assert (raw["name"], raw["model"], raw["size_vram"]) == (embedded.model, embedded.model, 0)
    assert raw["context_length"] == embedded.app.state.settings.embedded_context == 1024
    assert raw["size"] == Path(embedded.app.state.backend.engine.model_path).stat().st_size
    # Kept loaded for good, as Ollama shows keep_alive -1: about 292 years from now.
    assert loaded.expires_at is not None
    assert loaded.expires_at.year - datetime.now(UTC).year in (292, 293)


def test_the_openai_models_list_the_embedded_capabilities_and_time(embedded: Gateway) -> None:
    client = embedded.openai_client()
    [listed] = client.models.list().data
    retrieved = client.models.retrieve(embedded.model)

    for model in (listed, retrieved):
        assert model.model_extra == {"capabilities": ["completion", "tools"]}
        assert model.created == pytest.approx(gguf_mtime(embedded), abs=1)


def test_minivaults_models_list_the_embedded_capabilities(embedded: Gateway) -> None:
    body = httpx.get(f"{embedded.url}/models").json()

    [model] = body["models"]
    assert (model["name"], model["capabilities"]) == (embedded.model, ["completion", "tools"])
    assert moment(model["modified_at"]).timestamp() == pytest.approx(gguf_mtime(embedded), abs=1)


# --- through one Ollama ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def through_ollama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with fake_gateway(tmp_path_factory.mktemp("capabilities") / "log.jsonl") as gateway:
        assert gateway.fake is not None
        gateway.fake.add_model(SEER, ["completion", "vision"])
        gateway.fake.add_model(BLIND, ["completion"])
        yield gateway


def test_the_openai_models_carry_ollamas_capabilities(through_ollama: Gateway) -> None:
    fake = through_ollama.fake
    assert fake is not None
    client = through_ollama.openai_client()

    listed = {model.id: model.model_extra for model in client.models.list().data}
    seer = client.models.retrieve(SEER)

    assert listed == {name: {"capabilities": sorted(fake.capabilities_of(name))} for name in fake.models}
    assert (listed[SEER], listed[BLIND]) == (
        {"capabilities": ["completion", "vision"]},
        {"capabilities": ["completion"]},
    )
    assert listed["llama3:latest"] == {"capabilities": ["completion", "tools"]}
    assert seer.model_extra == {"capabilities": ["completion", "vision"]}
    assert seer.created == int(moment(MODIFIED_AT).timestamp())


def test_minivaults_models_carry_ollamas_capabilities(through_ollama: Gateway) -> None:
    models = {m["name"]: m for m in httpx.get(f"{through_ollama.url}/models").json()["models"]}

    assert models[SEER]["capabilities"] == ["completion", "vision"]
    assert models[BLIND]["capabilities"] == ["completion"]
    assert models[SEER]["modified_at"] == MODIFIED_AT


def test_show_and_ps_are_ollamas_own_through_ollama(through_ollama: Gateway) -> None:
    with ollama.Client(host=through_ollama.url, timeout=30) as client:
        shown = client.show(SEER)
        [loaded] = client.ps().models

    assert shown.capabilities == ["completion", "vision"]
    assert loaded.context_length == 4096
    assert loaded.expires_at is not None and loaded.expires_at > datetime.now(UTC)


# --- through a pool of Ollama hosts ------------------------------------------------------------------


@contextmanager
def pool_gateway(fakes: list[FakeOllama], log_path: Path) -> Iterator[RunningServer]:
    """MiniVault over `fakes` (round-robin, so where plain prompts go is fixed), hosts checked at start-up."""
    with ExitStack() as stack:
        urls = [stack.enter_context(serve_in_thread(fake, lifespan="off")).url for fake in fakes]
        settings = make_settings(
            ollama_base_urls=",".join(urls), log_path=log_path, routing="round_robin", host_check_seconds=60
        )
        yield wait_started(stack.enter_context(serve_in_thread(create_app(settings))))


def prompts_for(fake: FakeOllama, model: str) -> int:
    return sum(1 for request in fake.requests if request.get("model") == model and request.get("prompt"))


@pytest.fixture
def sighted_and_blind(tmp_path: Path) -> Iterator[tuple[FakeOllama, FakeOllama, RunningServer]]:
    """Two hosts with SEER: only the first's sees. BLIND sees on neither."""
    sighted, blind = FakeOllama(), FakeOllama()
    sighted.add_model(SEER, ["completion", "vision"])
    blind.add_model(SEER, ["completion"])
    for fake in (sighted, blind):
        fake.add_model(BLIND, ["completion"])
    with pool_gateway([sighted, blind], tmp_path / "log.jsonl") as server:
        yield sighted, blind, server


def test_an_image_prompt_goes_only_to_the_host_whose_model_sees(
    sighted_and_blind: tuple[FakeOllama, FakeOllama, RunningServer],
) -> None:
    sighted, blind, server = sighted_and_blind
    body = {"prompt": "what is it", "model": SEER, "images": [PIXEL]}

    answers = [httpx.post(f"{server.url}/generate", json=body, timeout=30) for _ in range(4)]
    with ollama.Client(host=server.url, timeout=30) as client:
        chats = [client.chat(SEER, messages=[{"role": "user", "content": "and this", "images": [PIXEL]}])
                 for _ in range(2)]  # fmt: skip

    assert [answer.status_code for answer in answers] == [200] * 4
    assert {answer.json()["response"] for answer in answers} == {"I see 1 image(s): 70 bytes. what is it"}
    assert [chat.message.content for chat in chats] == ["I see 1 image(s): 70 bytes. and this"] * 2
    assert (prompts_for(sighted, SEER), prompts_for(blind, SEER)) == (6, 0)


def test_a_plain_prompt_still_takes_turns_across_the_hosts(
    sighted_and_blind: tuple[FakeOllama, FakeOllama, RunningServer],
) -> None:
    sighted, blind, server = sighted_and_blind

    answers = [httpx.post(f"{server.url}/generate", json={"prompt": f"p{i}", "model": SEER}) for i in range(4)]

    assert [answer.json()["response"] for answer in answers] == ["p0", "p1", "p2", "p3"]
    assert (prompts_for(sighted, SEER), prompts_for(blind, SEER)) == (2, 2)
    # Nothing was asked of a host for a prompt that needs only text.
    assert [path for fake in (sighted, blind) for path, _ in fake.received if path == "/api/show"] == []


def test_keep_alive_zero_unloads_the_model_on_every_host_that_has_it(
    sighted_and_blind: tuple[FakeOllama, FakeOllama, RunningServer],
) -> None:
    # Open WebUI's Unload: a chat with no messages and keep_alive 0. One host unloading would leave it loaded.
    sighted, blind, server = sighted_and_blind

    answer = httpx.post(f"{server.url}/api/chat", json={"model": SEER, "messages": [], "keep_alive": 0})

    assert answer.status_code == 200
    assert (answer.json()["done"], answer.json()["done_reason"]) == (True, "unload")
    assert (sighted.unloads, blind.unloads) == (1, 1)


def test_an_image_prompt_no_host_can_see_is_a_400_naming_vision(
    sighted_and_blind: tuple[FakeOllama, FakeOllama, RunningServer],
) -> None:
    sighted, blind, server = sighted_and_blind

    rest = httpx.post(f"{server.url}/generate", json={"prompt": "look", "model": BLIND, "images": [PIXEL]})
    native = httpx.post(f"{server.url}/api/generate", json={"prompt": "look", "model": BLIND, "images": [PIXEL]})

    message = 'model "blind:latest" does not support vision'
    assert (rest.status_code, rest.json()["error"]["code"], rest.json()["error"]["message"]) == (
        400, "missing_capability", message
    )  # fmt: skip
    assert (native.status_code, native.json()) == (400, {"error": message})
    assert (prompts_for(sighted, BLIND), prompts_for(blind, BLIND)) == (0, 0)


def test_the_pools_listings_show_what_some_host_can_do(
    sighted_and_blind: tuple[FakeOllama, FakeOllama, RunningServer],
) -> None:
    _, _, server = sighted_and_blind

    shown = httpx.post(f"{server.url}/api/show", json={"model": SEER}).json()
    blind = httpx.post(f"{server.url}/api/show", json={"model": BLIND}).json()
    models = {m.id: m.model_extra for m in openai.OpenAI(base_url=f"{server.url}/v1", api_key="x").models.list().data}
    loaded = httpx.get(f"{server.url}/api/ps").json()["models"]

    assert (shown["capabilities"], shown["modified_at"]) == (["completion", "vision"], MODIFIED_AT)
    assert blind["capabilities"] == ["completion"]
    assert models[SEER] == {"capabilities": ["completion", "vision"]}
    # The hosts' own /api/ps (each lists its first model, tinyllama), once per model.
    assert [(m["name"], m["context_length"], set(m)) for m in loaded] == [("tinyllama:1.1b-chat", 4096, PS_FIELDS)]


# --- the pool's routing, host by host --------------------------------------------------------------


class Host:
    """A host backend that answers "ok" and counts what it is asked; `gate`, when set, holds its capability answer
    (`reached` is set once a question waits on it)."""

    name = "ollama"
    default_model = SEER

    def __init__(self, url: str, capabilities: set[str]) -> None:
        self.url = url
        self.can = frozenset(capabilities)
        self.asked = 0
        self.prompts = 0
        self.gate: asyncio.Event | None = None
        self.reached = asyncio.Event()
        self.failure: Exception | None = None

    async def stream(self, chat: ChatInput, completion: Completion) -> AsyncGenerator[str, None]:
        self.prompts += 1
        yield "ok"

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(SEER)]

    async def capabilities(self, model: str) -> frozenset[str]:
        self.asked += 1
        if self.gate is not None:
            self.reached.set()
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return self.can

    async def inventory(self, seconds: float) -> tuple[list[ModelInfo], set[str]]:
        return [ModelInfo(SEER)], set()

    async def warm(self, model: str) -> None:
        pass


IMAGE = Image(b"\x89PNG\r\n\x1a\n", "image/png")
LOOK = ChatInput.single(SEER, "look", images=(IMAGE,))
PLAIN = ChatInput.single(SEER, "hello")


async def answer(pool: HostPool, chat: ChatInput) -> str:
    return "".join([text async for text in pool.stream(chat, Completion())])  # type: ignore[misc]


async def started(*hosts: Host) -> HostPool:
    pool = HostPool(list(hosts), default_model=SEER, limit=4, routing="round_robin")  # type: ignore[arg-type]
    await pool.check_all()
    return pool


@pytest.mark.anyio
async def test_each_host_is_asked_once_per_model_and_again_at_its_next_check() -> None:
    sighted, blind = Host("http://a", {"completion", "vision"}), Host("http://b", {"completion"})
    pool = await started(sighted, blind)

    assert [await answer(pool, LOOK) for _ in range(3)] == ["ok"] * 3
    assert [await answer(pool, PLAIN) for _ in range(4)] == ["ok"] * 4
    assert (sighted.prompts, blind.prompts, sighted.asked, blind.asked) == (5, 2, 1, 1)

    blind.can = frozenset({"completion", "vision"})  # re-pulled with a vision projector
    await pool.check_all()
    assert (sighted.asked, blind.asked) == (2, 2)
    for _ in range(4):
        await answer(pool, LOOK)
    assert (sighted.prompts, blind.prompts) == (7, 4)


@pytest.mark.anyio
async def test_prompts_waiting_on_the_same_question_share_one_answer() -> None:
    sighted, blind = Host("http://a", {"completion", "vision"}), Host("http://b", {"completion"})
    pool = await started(sighted, blind)
    sighted.gate = asyncio.Event()

    waiting = [asyncio.create_task(answer(pool, LOOK)) for _ in range(5)]
    # The one question is asked a step after all five prompts found it pending (or asked their own).
    await sighted.reached.wait()
    sighted.gate.set()

    assert await asyncio.gather(*waiting) == ["ok"] * 5
    assert (sighted.asked, sighted.prompts, blind.prompts) == (1, 5, 0)


@pytest.mark.anyio
async def test_no_able_host_names_what_the_best_one_lacks() -> None:
    seeing, tooling = Host("http://a", {"completion", "vision"}), Host("http://b", {"completion", "tools"})
    pool = await started(seeing, tooling)
    needs_both = ChatInput(SEER, (Message("user", "look", images=(IMAGE,)),), tools=(Tool("lookup"),))
    thinking = ChatInput.single(SEER, "hmm", think=True)

    with pytest.raises(InvalidRequest) as both:
        await answer(pool, needs_both)
    with pytest.raises(InvalidRequest) as thinks:
        await answer(pool, thinking)

    assert both.value.message in ('model "seer:latest" does not support tools',
                                  'model "seer:latest" does not support vision')  # fmt: skip
    assert thinks.value.message == 'model "seer:latest" does not support thinking'
    assert (seeing.prompts, tooling.prompts) == (0, 0)


@pytest.mark.anyio
async def test_a_host_that_cannot_say_is_a_503_when_no_other_can_answer() -> None:
    mute, blind = Host("http://a", {"completion", "vision"}), Host("http://b", {"completion"})
    pool = await started(mute, blind)
    mute.failure = BackendUnavailable("cannot reach Ollama at http://a")

    with pytest.raises(BackendUnavailable) as caught:
        await answer(pool, LOOK)
    mute.failure = None
    recovered = await answer(pool, LOOK)  # not kept: asked again

    assert "http://a (cannot reach Ollama at http://a)" in caught.value.message
    assert (recovered, mute.asked, mute.prompts, blind.prompts) == ("ok", 2, 1, 0)
