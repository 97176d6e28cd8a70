"""Conversations: create, list, read and forget them; prompts join one with `conversation_id`."""

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from app.core.conversations import ConversationMemory
from app.errors import InvalidRequest, NotFound
from app.routes.generate import ERRORS
from app.schemas import ErrorBody, parse_body
from app.store import Conversation
from app.web.auth import key_id_of, visible_to

router = APIRouter(prefix="/conversations", tags=["conversations"])

_ID = r"^[A-Za-z0-9._:\-]{1,128}$"
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "not_found: no conversation with that id (or it is another key's)"}
}
_CURSOR = r"^[0-9]{1,18}$"
_OFF: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "invalid_request; also when MINIVAULT_LOG_PROMPTS=false"}
}


class NewConversation(BaseModel):
    """The (optional) body of `POST /conversations`."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{"system": "Be brief."}]})

    system: str | None = Field(
        default=None, description="System prompt for every turn, unless a prompt brings its own."
    )


class TurnOut(BaseModel):
    prompt: str
    response: str
    exchange_id: str
    ts: str


_CONVERSATION_EXAMPLE: dict[str, Any] = {
    "id": "4f1c2b7e9a0d4e5f8a6b3c2d1e0f9a8b", "title": "Why is the sky blue?", "system": "Be brief.",
    "created": "2026-11-29T21:40:56.445Z", "updated": "2026-11-29T21:41:10.002Z",
}  # fmt: skip
_TURN_EXAMPLE: dict[str, Any] = {
    "prompt": "Why is the sky blue?", "response": "Air scatters blue light the most.",
    "exchange_id": "5f0c3f7e2b9d4c3e8a1b2c3d4e5f6a7b", "ts": "2026-11-29T21:41:09.120Z",
}  # fmt: skip


class ConversationOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{**_CONVERSATION_EXAMPLE, "turns": None}]})

    id: str
    title: str | None = Field(description="The first prompt, shortened; null until the first answer.")
    system: str | None
    created: str
    updated: str
    turns: list[TurnOut] | None = Field(None, description="Null here: GET /conversations/{id} pages the turns.")


class ConversationTurns(ConversationOut):
    """A conversation with one page of its turns, oldest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{**_CONVERSATION_EXAMPLE, "turns": [_TURN_EXAMPLE], "turn_count": 3, "next_cursor": "1"}]
        }
    )

    turns: list[TurnOut] = Field(description="Oldest first: at most `limit` of them, after `cursor`.")
    turn_count: int = Field(description="All the conversation's turns, on every page.")
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the turns after these; null on the last page. Stable while turns are added."
    )


class ConversationPage(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [_CONVERSATION_EXAMPLE], "next_cursor": None}]})

    items: list[ConversationOut]
    next_cursor: str | None


def _memory(request: Request) -> ConversationMemory:
    memory: ConversationMemory | None = request.app.state.service.memory
    if memory is None:
        raise InvalidRequest(
            "conversations are off: MINIVAULT_LOG_PROMPTS=false forbids storing the turns they are made of"
        )
    return memory


def _not_found(conversation_id: str) -> NotFound:
    return NotFound(f"no conversation with id {conversation_id!r}; GET /conversations lists them")


def _out(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "title": conversation.title,
        "system": conversation.system,
        "created": conversation.created,
        "updated": conversation.updated,
    }


@router.post(
    "",
    status_code=201,
    response_model=ConversationOut,
    responses={**_OFF, **{status: ERRORS[status] for status in (413,)}},
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewConversation"}}},
        }
    },
)
async def create_conversation(request: Request) -> dict[str, Any]:
    """Start a conversation and return its id; pass it as `conversation_id` with each prompt."""
    memory = _memory(request)
    raw = await request.body()
    body = parse_body(NewConversation, raw, '{"system": "Be brief."}') if raw.strip() else NewConversation()
    return _out(await memory.store.create(system=body.system, key_id=key_id_of(request)))


@router.get("", response_model=ConversationPage, responses=_OFF)
async def list_conversations(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=200, description="Conversations per page.")] = 50,
    cursor: Annotated[str | None, Query(pattern=_CURSOR, description="`next_cursor` of the previous page.")] = None,
) -> dict[str, Any]:
    """Conversations, most recently continued first, titled by their first prompt (an ordinary key: its own)."""
    found, next_cursor = await _memory(request).store.list(limit, cursor, visible_to=visible_to(request))
    return {"items": [_out(c) for c in found], "next_cursor": next_cursor}


@router.get("/{conversation_id}", response_model=ConversationTurns, responses={**_NOT_FOUND, **_OFF})
async def get_conversation(
    request: Request,
    conversation_id: Annotated[str, Path(pattern=_ID)],
    limit: Annotated[int, Query(ge=1, le=500, description="Turns per page.")] = 100,
    cursor: Annotated[
        str | None, Query(pattern=_CURSOR, description="`next_cursor` of the previous page.", examples=["100"])
    ] = None,
) -> dict[str, Any]:
    """One conversation with a page of its turns, oldest first; `next_cursor` leads to the next page."""
    store = _memory(request).store
    # One turn more than the page tells whether there is a next one.
    conversation = await store.get(
        conversation_id, visible_to=visible_to(request), after=int(cursor) if cursor else 0, limit=limit + 1
    )
    if conversation is None:
        raise _not_found(conversation_id)
    turns = conversation.turns[:limit]
    body = _out(conversation)
    body["turns"] = [{"prompt": t.prompt, "response": t.response, "exchange_id": t.exchange_id, "ts": t.ts}
                     for t in turns]  # fmt: skip
    body["turn_count"] = conversation.turn_count
    body["next_cursor"] = str(turns[-1].n) if len(conversation.turns) > limit else None
    return body


@router.delete("/{conversation_id}", status_code=204, responses={**_NOT_FOUND, **_OFF})
async def delete_conversation(
    request: Request, conversation_id: Annotated[str, Path(pattern=_ID, examples=["4f1c2b7e9a0d4e5f8a6b3c2d1e0f9a8b"])]
) -> Response:
    """Forget a conversation and its turns (the interaction log keeps its exchanges)."""
    if not await _memory(request).store.delete(conversation_id, visible_to=visible_to(request)):
        raise _not_found(conversation_id)
    return Response(status_code=204)
