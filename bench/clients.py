"""The upstream client alone: CPU per streamed request for the HTTP clients MiniVault could use.

The same 16-token NDJSON answer from the fast fake, fetched in this process one request at a
time, through aiohttp directly, httpx over httpx-aiohttp (what MiniVault ships), and httpx
with its default transport. It shows what the choice of client costs and what is left on the
table by keeping httpx's API.
"""

import json
import resource
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import uvloop

from app.backends.transport import pooled_client
from app.config import Settings

BODY = json.dumps({"model": "bench:latest", "prompt": "tokens=16", "stream": True}).encode()
HEADERS = {"Content-Type": "application/json"}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _per_request_us(fetch: Callable[[], Awaitable[None]], count: int) -> float:
    for _ in range(count // 10):
        await fetch()
    before = _cpu()
    for _ in range(count):
        await fetch()
    return (_cpu() - before) / count * 1e6


async def measure(base_url: str, count: int) -> dict[str, float]:
    results = {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:

        async def direct() -> None:
            async with session.post(f"{base_url}/api/generate", data=BODY, headers=HEADERS) as response:
                async for _ in response.content.iter_chunked(16384):
                    pass

        results["client_aiohttp_us"] = await _per_request_us(direct, count)
    for transport in ("aiohttp", "httpx"):
        settings = Settings(_env_file=None, upstream_transport=transport)  # type: ignore[call-arg]
        async with pooled_client(settings, base_url) as client:

            async def via_httpx(client: httpx.AsyncClient = client) -> None:
                async with client.stream("POST", "/api/generate", content=BODY, headers=HEADERS) as response:
                    async for _ in response.aiter_raw():
                        pass

            results[f"client_httpx_{transport}_us"] = await _per_request_us(via_httpx, count)
    return results


def run(base_url: str, count: int) -> dict[str, float]:
    # The event loop MiniVault runs on under uvicorn.
    return uvloop.run(measure(base_url, count))
