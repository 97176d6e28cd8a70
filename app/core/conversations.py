"""Conversation memory: the turns a prompt is sent with, bounded, and one writer per conversation at a time."""

import asyncio
import logging
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from app.backends import ChatInput
from app.errors import NotFound
from app.store import ConversationStore, Turn
from app.vocabulary import Image, Message, OutputFormat, Think

logger = logging.getLogger(__name__)


@runtime_checkable
class SharedLocks(Protocol):
    """A store shared by several processes (PostgreSQL) locks a conversation against all of them."""

    def lock(self, conversation_id: str) -> AbstractAsyncContextManager[None]: ...


@dataclass(frozen=True, slots=True)
class ContextLimits:
    max_turns: int
    max_chars: int


class ConversationMemory:
    """Builds the upstream messages of a conversation's next prompt and keeps the finished turn.

    `acquire(id)` serializes prompts to one conversation: a second prompt waits for the first
    answer, then sees it in its context. Within this process an asyncio lock does it; a store
    shared by replicas (`SharedLocks`) adds its own lock, taken after the local one, so one prompt
    per conversation and process waits on the database at a time.
    """

    def __init__(self, store: ConversationStore, limits: ContextLimits) -> None:
        self.store = store
        self.limits = limits
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._shared = store if isinstance(store, SharedLocks) else None
        self._held: dict[str, AsyncExitStack] = {}  # the shared locks held, by conversation
        self._releasing: set[asyncio.Task[None]] = set()

    async def acquire(self, conversation_id: str) -> None:
        """Wait until no other prompt of this conversation is being answered; pair with `release`."""
        lock, users = self._locks.get(conversation_id) or (asyncio.Lock(), 0)
        self._locks[conversation_id] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._forget(conversation_id)
            raise
        if self._shared is None:
            return
        held = AsyncExitStack()
        try:
            await held.enter_async_context(self._shared.lock(conversation_id))
        except BaseException:
            self._release_local(conversation_id)
            raise
        self._held[conversation_id] = held

    def release(self, conversation_id: str) -> None:
        """Let the next prompt of this conversation go (it is called from `finally` blocks, so never waits)."""
        held = self._held.pop(conversation_id, None)
        if held is None:
            self._release_local(conversation_id)
            return
        # Giving the shared lock back is a database round trip: a task does it, and frees the local lock
        # only then, so the next prompt here finds the database lock free instead of waiting for it on a
        # second connection.
        task = asyncio.get_running_loop().create_task(self._release_shared(conversation_id, held))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def aclose(self) -> None:
        """Wait for shared locks still being given back (before the store closes)."""
        while self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    async def _release_shared(self, conversation_id: str, held: AsyncExitStack) -> None:
        try:
            await held.aclose()
        except Exception:  # the lock's session is closed by then, which frees the lock all the same
            logger.exception("conversation %r: giving its lock back failed", conversation_id)
        finally:
            self._release_local(conversation_id)

    def _release_local(self, conversation_id: str) -> None:
        self._locks[conversation_id][0].release()
        self._forget(conversation_id)

    def _forget(self, conversation_id: str) -> None:
        lock, users = self._locks[conversation_id]
        if users == 1:
            del self._locks[conversation_id]
        else:
            self._locks[conversation_id] = (lock, users - 1)

    async def chat_input(
        self,
        conversation_id: str,
        model: str,
        prompt: str,
        system: str | None,
        options: dict[str, Any] | None,
        visible_to: str | None = None,
        *,
        format: OutputFormat | None = None,
        think: Think = None,
        images: tuple[Image, ...] = (),
    ) -> ChatInput:
        """The messages for `prompt`: system first (the request's, else the conversation's), then the
        latest turns that fit MINIVAULT_MAX_TURNS and MINIVAULT_MAX_CONTEXT_CHARS, then the prompt.

        `visible_to` is an ordinary key's key_id: another key's conversation is NotFound (None: any).
        The prompt's images, format and thinking go with this prompt only: the turns kept are text.
        """
        limits = self.limits
        conversation = await self.store.recent(conversation_id, limits.max_turns, limits.max_chars)
        if conversation is not None and visible_to is not None and conversation.key_id != visible_to:
            raise NotFound(f"no conversation with id {conversation_id!r}; GET /conversations lists them")
        turns = conversation.turns if conversation else []
        if system is None and conversation is not None:
            system = conversation.system
        kept = _latest_that_fit(turns, limits)
        messages = [Message("system", system)] if system is not None else []
        for turn in kept:
            messages.append(Message("user", turn.prompt))
            messages.append(Message("assistant", turn.response))
        messages.append(Message("user", prompt, images=images))
        return ChatInput(model, tuple(messages), options, conversation=True, format=format, think=think)

    async def remember(self, conversation_id: str, turn: Turn, system: str | None, key_id: str | None = None) -> None:
        """Keep a finished turn (a failed or cancelled answer never gets here); a new conversation is `key_id`'s."""
        await self.store.append(conversation_id, turn, system, key_id)


def _latest_that_fit(turns: list[Turn], limits: ContextLimits) -> list[Turn]:
    # The store already read only these (in SQL); this is the exact count, in Python's characters, which
    # SQLite's length() can undercount (it stops at a U+0000).
    kept: list[Turn] = []
    chars = 0
    for turn in reversed(turns[-limits.max_turns :] if limits.max_turns else []):
        chars += len(turn.prompt) + len(turn.response)
        if chars > limits.max_chars:
            break
        kept.append(turn)
    kept.reverse()
    return kept
