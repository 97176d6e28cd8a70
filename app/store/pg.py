"""MINIVAULT_DATABASE_URL: the history and the conversations in PostgreSQL, opened and closed with the app."""

from contextlib import AsyncExitStack

from app.config import Settings
from app.store.pg_conversations import PgConversations
from app.store.pg_history import PgHistory
from app.store.pg_schema import PgUnavailable
from app.store.sqlite_history import SearchBudget

__all__ = ["PgConversations", "PgHistory", "PgUnavailable", "open_pg_stores"]


async def open_pg_stores(settings: Settings, stack: AsyncExitStack) -> tuple[PgHistory, PgConversations]:
    """Migrate the schema, open both stores (the history's writer thread started) and have `stack` close them.

    Raises PgUnavailable, naming the server but not the password, when PostgreSQL cannot be reached or
    its schema cannot be made. The lock pool holds one connection per conversation being answered or
    queued, so it is sized MINIVAULT_MAX_CONCURRENCY + MINIVAULT_MAX_QUEUE.
    """
    if settings.database_url is None:
        raise ValueError("open_pg_stores needs MINIVAULT_DATABASE_URL")
    url = settings.database_url.get_secret_value()
    history = PgHistory(url, keep_text=settings.log_prompts, readers=settings.history_readers,
                        budget=SearchBudget.of(settings))  # fmt: skip
    stack.push_async_callback(history.aclose)  # before open(): it also closes what a failed open() left
    await history.open()
    conversations = PgConversations(url, lock_connections=settings.max_concurrency + settings.max_queue)
    stack.push_async_callback(conversations.aclose)
    await conversations.open()
    return history, conversations
