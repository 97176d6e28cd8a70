"""Choosing and opening the stores at start-up: PostgreSQL when MINIVAULT_DATABASE_URL is set, else SQLite."""

from contextlib import AsyncExitStack

from app.config import Settings
from app.store.base import ConversationStore, HistoryStore
from app.store.sqlite_conversations import SqliteConversations
from app.store.sqlite_history import SearchBudget, SqliteHistory


async def open_stores(settings: Settings, stack: AsyncExitStack) -> tuple[HistoryStore, ConversationStore | None]:
    """The history, and the conversation store (None when texts may not be kept); `stack` closes them."""
    if settings.database_url is not None:
        from app.store.pg import open_pg_stores  # psycopg is imported only by those who use it

        history, conversations = await open_pg_stores(settings, stack)
        return history, conversations if settings.log_prompts else None
    # The store owns its reader threads (MINIVAULT_HISTORY_READERS) and shuts them down when it closes.
    sqlite_history = SqliteHistory(settings.db_path, keep_text=settings.log_prompts,
                                   readers=settings.history_readers, budget=SearchBudget.of(settings))  # fmt: skip
    sqlite_history.start()
    stack.push_async_callback(sqlite_history.aclose)
    if not settings.log_prompts:
        return sqlite_history, None
    sqlite_conversations = SqliteConversations(settings.db_path)
    stack.push_async_callback(sqlite_conversations.aclose)
    return sqlite_history, sqlite_conversations
