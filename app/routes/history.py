"""GET /history (search and filter every exchange), GET /history/{id}, GET /history/stats.

With keys set, an ordinary key sees only the exchanges it made (by key_id), as if no other existed;
an admin key (MINIVAULT_ADMIN_KEYS), or anyone when auth is off, sees them all.
"""

import re
from datetime import UTC, date, datetime, time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from app.errors import NotFound
from app.routes.generate import ERRORS
from app.schemas import Endpoint, ErrorBody, ExchangeRecord, Status
from app.store import HistoryQuery, HistoryStore
from app.store.sqlite_history import CURSOR_PATTERN, PAIRED_QUOTES, RANK_WINDOW
from app.web.auth import visible_to
from app.web.responses import OrjsonResponse

router = APIRouter(prefix="/history", tags=["history"])

_RECORD_EXAMPLE: dict[str, Any] = {
    "id": "5f0c3f7e2b9d4c3e8a1b2c3d4e5f6a7b", "ts": "2026-11-29T21:40:56.445Z", "endpoint": "rest",
    "client": "127.0.0.1:58936", "key_id": None, "conversation_id": None, "backend": "ollama",
    "model": "tinyllama:1.1b-chat", "prompt": "Explain gravity in one sentence.", "system": None,
    "options": {"temperature": 0.2}, "response": "Gravity is the force by which a planet draws objects toward it.",
    "prompt_chars": 32, "response_chars": 63, "status": "ok", "error": None, "done_reason": "stop",
    "prompt_tokens": 24, "completion_tokens": 15, "queue_ms": 0.021, "ttft_ms": 23.8, "latency_ms": 845.4,
}  # fmt: skip
# An exchange beyond text: a tool offered, an image sent (kept as its size and sha256), the call the model made
# and its thinking.
_TOOL_EXAMPLE: dict[str, Any] = {
    **_RECORD_EXAMPLE, "id": "9b1e6a2c4d8f4e0a9c3b7d5e1f2a4c6e", "endpoint": "ollama", "model": "qwen3:0.6b",
    "prompt": "What is the weather where this photo was taken?", "options": None, "response": "",
    "prompt_chars": 47, "response_chars": 0, "done_reason": "stop", "upstream": "http://127.0.0.1:11434",
    "tools": ["get_weather"],
    "images": [{"media_type": "image/jpeg", "bytes": 48213,
                "sha256": "2a0f832bcdffd3915f9d1eedff54f2d4af925a2b7adf57359a23a3b702c8cc15"}],
    "tool_calls": [{"id": "call_0", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}],
    "thinking": "The photo shows the Eiffel Tower, so the city is Paris.", "thinking_chars": 55,
}  # fmt: skip
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: ERRORS[401],
    422: {"model": ErrorBody, "description": "invalid_request: a parameter is not valid (the message names it)"},
}
_SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: ERRORS[401],
    422: {
        "model": ErrorBody,
        "description": "invalid_request: a parameter is not valid (the message names it), or `q` has more words "
        "than MINIVAULT_HISTORY_MAX_TERMS (16 by default) or a prefix shorter than MINIVAULT_HISTORY_MIN_PREFIX "
        "(3 characters before the `*`); query_too_expensive: the search ran past MINIVAULT_HISTORY_QUERY_SECONDS "
        "(1 s by default) and was stopped: narrow it (fewer words, longer prefixes, a `model` or `since` filter)",
    },
}


class HistoryPageOut(BaseModel):
    """One page of exchanges, as the log records them."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [_TOOL_EXAMPLE, _RECORD_EXAMPLE], "next_cursor": "AAAAAAAB4kA_88CDEm6XjQAAAAAAAeII"}]
        }
    )

    items: list[ExchangeRecord] = Field(description="Newest first; with `q`, best match first.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class Percentiles(BaseModel):
    p50: float
    p90: float
    p99: float


class DayStats(BaseModel):
    day: str = Field(description="UTC day the exchanges started on.")
    model: str | None
    count: int
    ok: int
    error: int
    cancelled: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: Percentiles | None = Field(
        description="Nearest-rank percentiles, each within 1% (they are read off 2% wide buckets); null when none "
        "was timed."
    )


class StatsOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"days": [{"day": "2026-11-29", "model": "tinyllama:1.1b-chat", "count": 120, "ok": 114, "error": 4,
                           "cancelled": 2, "prompt_tokens": 3080, "completion_tokens": 20211,
                           "latency_ms": {"p50": 812.0, "p90": 1630.5, "p99": 2950.1}}]}
            ]
        }
    )  # fmt: skip

    days: list[DayStats] = Field(description="One entry per UTC day and model, oldest day first.")


_ISO_TIME = re.compile(r"\d{4}-\d\d-\d\d([Tt ]\d\d:\d\d(:\d\d(\.\d+)?)?([Zz]|[+-]\d\d:?\d\d)?)?")


def _iso_time(value: object) -> object:
    """ISO 8601 only: pydantic alone would also take `0.5` (seconds since 1970)."""
    if isinstance(value, str) and not _ISO_TIME.fullmatch(value):
        raise ValueError("must be an ISO 8601 date, or date and time, like 2026-11-29 or 2026-11-29T08:00:00Z")
    return value


def _moment(value: datetime | date | None) -> datetime | None:
    """A bare date is its midnight, UTC."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.combine(value, time(), UTC)


_ZONE = "ISO 8601; without a zone, UTC; a bare date is its midnight"
Since = Annotated[
    datetime | date | None,
    BeforeValidator(_iso_time),
    Query(description=f"Only exchanges that started at or after this time ({_ZONE}).",
          examples=["2026-11-29T00:00:00Z"]),
]  # fmt: skip
Until = Annotated[
    datetime | date | None,
    BeforeValidator(_iso_time),
    Query(description=f"Only exchanges that started before this time ({_ZONE}).", examples=["2026-11-30T00:00:00Z"]),
]


def _store(request: Request) -> HistoryStore:
    return request.app.state.history


@router.get("", response_model=HistoryPageOut, responses=_SEARCH_ERRORS)
async def history(
    request: Request,
    q: Annotated[
        str | None,
        Query(
            max_length=1000,
            description="Words that must all appear in the prompt or the answer; `pre*` matches words starting "
            'with `pre`; "two words" in double quotes match as a phrase. Best match first (more matches, in a '
            f"shorter exchange), among the newest {RANK_WINDOW:,} matches, then the next {RANK_WINDOW:,}, and so on. "
            "At most MINIVAULT_HISTORY_MAX_TERMS words (16), each prefix at least MINIVAULT_HISTORY_MIN_PREFIX "
            "characters (3) before its `*`; a search is stopped after MINIVAULT_HISTORY_QUERY_SECONDS (1 s).",
            examples=["gravity", "photo*", '"black hole" mass'],
            json_schema_extra={"pattern": PAIRED_QUOTES},
        ),
    ] = None,
    model: Annotated[str | None, Query(description="Only this model.", examples=["tinyllama:1.1b-chat"])] = None,
    status: Annotated[Status | None, Query(description="Only exchanges that ended this way.")] = None,
    endpoint: Annotated[Endpoint | None, Query(description="Only exchanges that came this way.")] = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Exchanges per page.")] = 50,
    cursor: Annotated[
        str | None, Query(pattern=CURSOR_PATTERN, description="`next_cursor` of the previous page, as it came.")
    ] = None,
) -> OrjsonResponse:
    """Every exchange (an ordinary key: every one it made), newest first, or the ones matching `q` best first;
    filters combine.

    Pages never repeat or skip an exchange, even while new ones arrive: those join the first page of a
    new search, not the pages of this one.
    """
    query = HistoryQuery(q=q, model=model, status=status, endpoint=endpoint, since=_moment(since),
                         until=_moment(until), limit=limit, cursor=cursor, key_id=visible_to(request))  # fmt: skip
    page = await _store(request).search(query)
    return OrjsonResponse({"items": page.items, "next_cursor": page.next_cursor})


@router.get("/stats", response_model=StatsOut, responses=_ERRORS)
async def history_stats(request: Request, since: Since = None, until: Until = None) -> OrjsonResponse:
    """Per UTC day and model: exchanges by outcome, token sums and latency percentiles (an ordinary key: of its own)."""
    days = await _store(request).stats(_moment(since), _moment(until), key_id=visible_to(request))
    return OrjsonResponse({"days": days})


@router.get(
    "/{exchange_id}",
    response_model=ExchangeRecord,
    responses={
        401: ERRORS[401],
        404: {"model": ErrorBody, "description": "not_found: no exchange with that id (that this key made)"},
    },
)
async def history_exchange(
    request: Request,
    exchange_id: Annotated[
        str, Path(description="The exchange's id (its X-Request-ID).", examples=["5f0c3f7e2b9d4c3e8a1b2c3d4e5f6a7b"])
    ],
) -> OrjsonResponse:
    """One exchange, as the log recorded it (the latest, if a client reused the id); another key's is not found."""
    record = await _store(request).get(exchange_id, key_id=visible_to(request))
    if record is None:  # the same answer whether it does not exist or is another key's
        raise NotFound(f"no exchange with id {exchange_id!r} in the history; GET /history lists them")
    return OrjsonResponse(record)
