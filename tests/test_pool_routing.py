"""HostPool's choices on stub hosts (no network): how loaded models and load share decide, and what a
prompt gets when no host can take it."""

from collections.abc import AsyncIterator

import pytest

from app.backends.base import ChatInput, Completion, ModelInfo
from app.backends.pool import HostPool
from app.errors import BackendError, BackendUnavailable, ModelNotFound

pytestmark = pytest.mark.anyio


class StubHost:
    """A host that answers from memory; `missing` makes it say 404, `failing` 502, before any token."""

    name = "ollama"
    default_model = "m"

    def __init__(self, url: str, models: list[str], loaded: set[str] | None = None) -> None:
        self.url = url
        self.models = models
        self.loaded = loaded or set()
        self.missing = False
        self.failing = False
        self.asked = 0

    async def stream(self, chat: ChatInput, completion: Completion) -> AsyncIterator[str]:
        self.asked += 1
        if self.missing:
            raise ModelNotFound(f"model '{chat.model}' is not installed in {self.url}")
        if self.failing:
            raise BackendError(f"{self.url} answered 500")
        yield "ok"

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(name) for name in self.models]

    async def inventory(self, seconds: float) -> tuple[list[ModelInfo], set[str]]:
        return await self.list_models(), set(self.loaded)

    async def warm(self, model: str) -> None:
        return None


async def pool_of(*hosts: StubHost, limit: int = 4) -> HostPool:
    pool = HostPool(list(hosts), default_model="m", limit=limit, cooldown_seconds=60)  # type: ignore[arg-type]
    await pool.check_all()
    return pool


async def answer(pool: HostPool, model: str = "m") -> str | None:
    completion = Completion()
    async for _ in pool.stream(ChatInput.single(model, "hi"), completion):
        pass
    return completion.host


async def test_a_loaded_host_is_preferred_only_while_under_its_share() -> None:
    loaded, cold = StubHost("http://a", ["m"], {"m"}), StubHost("http://b", ["m"])
    pool = await pool_of(loaded, cold, limit=4)  # a share of 2 per host
    a, b = pool.hosts

    assert pool.pick("m", []) is a
    a.in_flight = 1
    assert pool.pick("m", []) is a  # loaded and under its share of 2
    a.in_flight = 2
    assert pool.pick("m", []) is b  # at its share: the cold host, less busy, takes it
    b.in_flight = 3
    assert pool.pick("m", []) is a


async def test_a_model_only_a_cooling_host_has_is_503_naming_it_not_404() -> None:
    only, other = StubHost("http://a", ["m", "rare"]), StubHost("http://b", ["m"])
    pool = await pool_of(only, other)
    only.failing = True

    with pytest.raises(BackendUnavailable) as first:
        await answer(pool, "rare")
    with pytest.raises(BackendUnavailable) as second:
        await answer(pool, "rare")

    assert "http://a (" in first.value.message and "cooling down" in second.value.message
    assert only.asked == 1  # the second prompt did not go to the cooling host


async def test_hosts_that_lost_the_model_give_their_own_404() -> None:
    stale = StubHost("http://a", ["m", "gone"])
    pool = await pool_of(stale, StubHost("http://b", ["m"]))
    stale.missing = True

    with pytest.raises(ModelNotFound) as caught:
        await answer(pool, "gone")

    assert caught.value.message == "model 'gone' is not installed in http://a"
    assert pool.hosts[0].cooldown_until == 0  # the host is fine; only the model was gone


async def test_equal_hosts_take_turns() -> None:
    hosts = [StubHost(f"http://{name}", ["m"], {"m"}) for name in "abc"]
    pool = await pool_of(*hosts)

    served = [await answer(pool) for _ in range(6)]

    assert sorted(served) == ["http://a", "http://a", "http://b", "http://b", "http://c", "http://c"]


async def test_one_prompt_at_a_time_stays_where_the_model_is_loaded() -> None:
    pool = await pool_of(StubHost("http://a", ["m"]), StubHost("http://b", ["m"]))

    served = [await answer(pool) for _ in range(4)]

    # The first answer loaded the model on its host; while that host is under its share, no other loads it.
    assert len(set(served)) == 1
