"""Conversation memory: the turns a prompt is sent with, bounded, and one writer per conversation at a time."""

import asyncio
from dataclasses import dataclass
from typing import Any

from app.backends import ChatInput
from app.store import ConversationStore, Turn


@dataclass(frozen=True, slots=True)
class ContextLimits:
    max_turns: int
    max_chars: int


class ConversationMemory:
    """Builds the upstream messages of a conversation's next prompt and keeps the finished turn.

    `acquire(id)` serializes prompts to one conversation: a second prompt waits for the first
    answer, then sees it in its context. (Within this process: replicas sharing a database
    need the database's own locking, which the PostgreSQL store brings.)
    """

    def __init__(self, store: ConversationStore, limits: ContextLimits) -> None:
        self.store = store
        self.limits = limits
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, conversation_id: str) -> None:
        """Wait until no other prompt of this conversation is being answered; pair with `release`."""
        lock, users = self._locks.get(conversation_id) or (asyncio.Lock(), 0)
        self._locks[conversation_id] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._forget(conversation_id)
            raise

    def release(self, conversation_id: str) -> None:
        self._locks[conversation_id][0].release()
        self._forget(conversation_id)

    def _forget(self, conversation_id: str) -> None:
        lock, users = self._locks[conversation_id]
        if users == 1:
            del self._locks[conversation_id]
        else:
            self._locks[conversation_id] = (lock, users - 1)

    async def chat_input(
        self, conversation_id: str, model: str, prompt: str, system: str | None, options: dict[str, Any] | None
    ) -> ChatInput:
        """The messages for `prompt`: system first (the request's, else the conversation's), then the
        latest turns that fit MINIVAULT_MAX_TURNS and MINIVAULT_MAX_CONTEXT_CHARS, then the prompt."""
        conversation = await self.store.get(conversation_id)
        turns = conversation.turns if conversation else []
        if system is None and conversation is not None:
            system = conversation.system
        kept = _latest_that_fit(turns, self.limits)
        messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system is not None else []
        for turn in kept:
            messages.append({"role": "user", "content": turn.prompt})
            messages.append({"role": "assistant", "content": turn.response})
        messages.append({"role": "user", "content": prompt})
        return ChatInput(model, tuple(messages), options, conversation=True)

    async def remember(self, conversation_id: str, turn: Turn, system: str | None) -> None:
        """Keep a finished turn (a failed or cancelled answer never gets here)."""
        await self.store.append(conversation_id, turn, system)


def _latest_that_fit(turns: list[Turn], limits: ContextLimits) -> list[Turn]:
    kept: list[Turn] = []
    chars = 0
    for turn in reversed(turns[-limits.max_turns :] if limits.max_turns else []):
        chars += len(turn.prompt) + len(turn.response)
        if chars > limits.max_chars:
            break
        kept.append(turn)
    kept.reverse()
    return kept
