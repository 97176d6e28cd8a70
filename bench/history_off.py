"""MiniVault exactly as shipped, except that its history store drops every exchange it is given.

The `off` side of bench.history's cost comparison: same code, same database opened, same writer thread
(idle), so the only difference from the shipped app is the writing of the history itself.
Served as `uvicorn bench.history_off:app`.
"""

from typing import Any

import app.main as shipped
import app.store.opening as opening
from app.store.sqlite_history import SqliteHistory


class DroppingHistory(SqliteHistory):
    def consume(self, record: Any) -> None:
        pass


opening.SqliteHistory = DroppingHistory  # type: ignore[misc]  # read by open_stores when the lifespan starts
app = shipped.create_app()
