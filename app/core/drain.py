"""Graceful shutdown: on SIGTERM (or a first Ctrl-C), finish the answers in flight, then let uvicorn stop.

uvicorn's own shutdown closes websockets at once (close code 1012) and waits without bound for
HTTP streams. So MiniVault takes the signal first: it stops listening, refuses new prompts
(503 `shutting_down`), gives answers in flight MINIVAULT_SHUTDOWN_GRACE seconds, ends the rest
with an error frame, event or 503, and only then hands the signal to uvicorn. Every exchange is
logged by then, and the lifespan's end flushes the log before the process exits.
"""

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from app.core.service import GenerationService

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_drain(service: GenerationService, grace: float) -> Callable[[], None]:
    """Put the drain in front of the current signal handlers; returns a function that restores them.

    Signal handlers belong to the main thread: elsewhere (an app served from a test thread) this
    does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    # Keyed by int: a handler is given the signal number as an int (Signals is an IntEnum, so the keys match).
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    tasks: set[asyncio.Task[None]] = set()

    def handler(sig: int, frame: FrameType | None) -> None:
        if service.draining:  # a second signal: stop now, the usual way
            _pass_on(previous[sig], sig, frame)
            return
        service.draining = True
        loop.call_soon_threadsafe(lambda: tasks.add(loop.create_task(drain(sig, frame))))

    async def drain(sig: int, frame: FrameType | None) -> None:
        _stop_listening(previous[sig])
        logger.info("shutting down: %d answers in flight, up to %g s to finish", service.in_flight, grace)
        ended = await service.drain(grace)
        if ended:
            logger.warning("shutting down: cut off %d answers after %g s (MINIVAULT_SHUTDOWN_GRACE)", ended, grace)
        _pass_on(previous[sig], sig, frame)

    for sig in _SIGNALS:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, old)

    return restore


def _pass_on(handler: Any, sig: int, frame: FrameType | None) -> None:
    if callable(handler):
        handler(sig, frame)
    elif handler == signal.SIG_DFL:
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)


def _stop_listening(handler: Any) -> None:
    # uvicorn's handler is a bound method of its Server, which holds the listening servers: closing
    # them stops new connections (a load balancer moves on) while open ones finish.
    for server in getattr(getattr(handler, "__self__", None), "servers", None) or ():
        server.close()
