"""What MiniVault keeps besides the JSONL log: the exchange history and conversations."""

from app.store.base import Conversation, ConversationStore, HistoryPage, HistoryQuery, HistoryStore, Turn

__all__ = ["Conversation", "ConversationStore", "HistoryPage", "HistoryQuery", "HistoryStore", "Turn"]
