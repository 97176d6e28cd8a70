"""MiniVault: a local REST, SSE and WebSocket gateway in front of a local LLM."""

__version__ = "0.2.0"
