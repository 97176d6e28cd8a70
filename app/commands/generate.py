"""`minivault generate "prompt"` (or just `minivault "prompt"`): one answer, streamed or whole."""

import json
import sys
from typing import Annotated, Any

import httpx
import typer
from httpx_sse import connect_sse

from app.commands.common import DEFAULT_URL, ApiKey, Url, client, error_message, fail, json_or_fail, print_json, say

commands = typer.Typer()


@commands.command()
def generate(
    prompt: Annotated[str, typer.Argument(help='The prompt; "-" reads it from stdin.')],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name; default: the server's.")] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="Model option key=value; repeatable.")
    ] = None,
    stream: Annotated[
        bool | None, typer.Option("--stream/--no-stream", help="Print tokens as they arrive (default on a terminal).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole `done` object as JSON.")] = False,
) -> None:
    """Send a prompt and print the model's answer."""
    if prompt == "-":
        prompt = sys.stdin.read()
    body: dict[str, Any] = {"prompt": prompt}
    if model:
        body["model"] = model
    if system is not None:
        body["system"] = system
    if option:
        body["options"] = parse_options(option)
    if stream is None:
        stream = sys.stdout.isatty() and not as_json
    with client(url, api_key) as opened:
        if stream:
            done = _stream_answer(opened, body)
            if as_json:
                print_json(done)
            return
        result = json_or_fail(opened.post("/generate", json=body))
    if as_json:
        print_json(result)
    else:
        say(result["response"])


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs with JSON-typed values: `temperature=0.2`, `num_predict=64`, `stop=["\\n"]`."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not key=value (for example temperature=0.2)", param_hint="--option")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        options[key] = [value] if key == "stop" and isinstance(value, str) else value
    return options


def _stream_answer(opened: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    with connect_sse(opened, "POST", "/generate", json={**body, "stream": True}) as source:
        if not source.response.is_success:
            source.response.read()
            json_or_fail(source.response)
        for event in source.iter_sse():
            data = json.loads(event.data)
            if event.event == "token":
                # Shown like the log shows it later: a model can be led to answer with terminal escapes.
                say(data["content"], nl=False)
            elif event.event == "done":
                typer.echo()
                return data
            elif event.event == "error":
                typer.echo()
                fail(error_message(data, 200))
    fail("the stream ended without a final event")
