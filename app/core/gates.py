"""The checks an exchange passes before admission, in order: each raises the refusal, or lets it through.

Draining first (shutdown refuses everything), then a model that is being pulled, then the key's rate.
"""

from collections.abc import Callable
from typing import Protocol

from app.admission.rate import RateLimiter
from app.core.exchange import Exchange
from app.errors import MiniVaultError, ShuttingDown


class Gate(Protocol):
    """One check before admission."""

    async def check(self, exchange: Exchange) -> None:
        """Raise a MiniVaultError to refuse the exchange."""
        ...


class DrainGate:
    """Closed at shutdown: from then on every new prompt is refused."""

    __slots__ = ("closed",)

    def __init__(self) -> None:
        self.closed = False

    async def check(self, exchange: Exchange) -> None:
        if self.closed:
            raise ShuttingDown("MiniVault is shutting down and takes no new prompts; retry in a moment")


class LoadingGate:
    """Refuses prompts for a model that cannot be used for a while (the auto-pull is downloading it)."""

    __slots__ = ("refusal",)

    def __init__(self, refusal: Callable[[str], MiniVaultError | None]) -> None:
        self.refusal = refusal

    async def check(self, exchange: Exchange) -> None:
        if (error := self.refusal(exchange.model)) is not None:
            raise error


class RateGate:
    """MINIVAULT_RATE_LIMIT: prompts per minute per key."""

    __slots__ = ("limiter",)

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def check(self, exchange: Exchange) -> None:
        await self.limiter.check(exchange.key_id)
