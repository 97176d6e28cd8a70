"""Where finished exchanges go: today one append-only JSON Lines file."""

from app.interactions.jsonl import JsonlWriter

__all__ = ["JsonlWriter"]
