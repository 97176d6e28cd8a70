"""Where finished exchanges go: one append-only JSON Lines file (rotated by size when configured),
and the readers that bring it back across its rotated files."""

from app.exchanges.jsonl import JsonlWriter

__all__ = ["JsonlWriter"]
