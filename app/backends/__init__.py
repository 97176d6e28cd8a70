"""Upstream LLM clients behind one interface: the routes never know which one runs."""

from app.backends.base import Backend, BackendStatus, Completion, ModelInfo
from app.backends.ollama import OllamaBackend

__all__ = ["Backend", "BackendStatus", "Completion", "ModelInfo", "OllamaBackend"]
