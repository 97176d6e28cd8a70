"""`minivault chat`: an interactive conversation in the terminal, the way `ollama run MODEL` works.

The conversation lives on the server (by id), so `--conversation ID` resumes it later. Ctrl-C
stops the answer in progress (MiniVault closes the upstream request, and the turn is not kept)
without leaving; `/bye` or Ctrl-D leaves; `/new` starts a fresh conversation.
"""

import json
from typing import Annotated, Any

import httpx
import typer
from httpx_sse import connect_sse

from app.commands.common import DEFAULT_URL, ApiKey, Url, client, error_message, fail, json_or_fail, say
from app.commands.generate import parse_options

commands = typer.Typer()

PROMPT = ">>> "
HELP = "/new starts a fresh conversation, /bye (or Ctrl-D) leaves, Ctrl-C stops an answer"


@commands.command()
def chat(
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name; default: the server's.")] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt of a new conversation.")] = None,
    conversation: Annotated[
        str | None, typer.Option("--conversation", "-c", help="Resume this conversation instead of starting one.")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Model option key=value; repeatable.")
    ] = None,
) -> None:
    """Chat with the model; the server keeps the conversation, so `--conversation ID` resumes it."""
    try:
        import readline  # noqa: F401 - line editing and history for input(), where the platform has it
    except ImportError:
        pass
    options = parse_options(option) if option else None
    with client(url, api_key) as opened:
        conversation_id = _resume(opened, conversation) if conversation else _start(opened, system)
        typer.echo(f"conversation {conversation_id} ({HELP})")
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                typer.echo()
                return
            except KeyboardInterrupt:
                typer.echo("\nUse Ctrl-D or /bye to leave.")
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/bye", "/exit"):
                return
            if text == "/new":
                conversation_id = _start(opened, system)
                typer.echo(f"conversation {conversation_id}")
                continue
            if text in ("/?", "/help"):
                typer.echo(HELP)
                continue
            body: dict[str, Any] = {"prompt": line, "conversation_id": conversation_id, "stream": True}
            if model:
                body["model"] = model
            if options:
                body["options"] = options
            try:
                _answer(opened, body)
            except KeyboardInterrupt:
                # Leaving the stream closes the request: MiniVault stops the model and keeps no turn.
                typer.echo("\n(stopped)")


def _start(opened: httpx.Client, system: str | None) -> str:
    return json_or_fail(opened.post("/conversations", json={"system": system} if system else {}))["id"]


def _resume(opened: httpx.Client, conversation_id: str) -> str:
    # One turn is enough: turn_count counts them all, however many pages they fill.
    found = json_or_fail(opened.get(f"/conversations/{conversation_id}", params={"limit": 1}))
    say(f"resuming {found['title'] or conversation_id}: {found['turn_count']} turns so far")
    return conversation_id


def _answer(opened: httpx.Client, body: dict[str, Any]) -> None:
    with connect_sse(opened, "POST", "/generate", json=body) as source:
        if not source.response.is_success:
            source.response.read()
            say(f"minivault: {error_message(_json(source.response), source.response.status_code)}", err=True)
            return
        for event in source.iter_sse():
            data = json.loads(event.data)
            if event.event == "token":
                say(data["content"], nl=False)  # the model's answer can carry escapes as well as a prompt
            elif event.event == "queued":
                typer.echo(f"(queued: number {data['position']} in line for the model)", err=True)
            elif event.event == "done":
                typer.echo()
                return
            elif event.event == "error":
                typer.echo()
                say(f"minivault: {error_message(data, 200)}", err=True)
                return
    fail("the stream ended without a final event")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
