"""Annotated dependencies: what the lifespan built, handed to routes by type.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in a worker thread.
"""

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from app.backends import Backend
from app.backends.probe import BackendProbe
from app.exchanges import JsonlWriter


async def _backend(connection: HTTPConnection) -> Backend:
    return connection.app.state.backend


async def _log(connection: HTTPConnection) -> JsonlWriter:
    return connection.app.state.interaction_log


async def _probe(connection: HTTPConnection) -> BackendProbe:
    return connection.app.state.probe


BackendDep = Annotated[Backend, Depends(_backend)]
LogDep = Annotated[JsonlWriter, Depends(_log)]
ProbeDep = Annotated[BackendProbe, Depends(_probe)]
