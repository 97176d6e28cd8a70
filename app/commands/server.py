"""Looking after MiniVault itself: `serve`, `health`, `models`, `pull`."""

import json
from typing import Annotated, Any

import typer
from httpx_sse import connect_sse
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from app.commands.common import (
    DEFAULT_URL,
    ApiKey,
    AsJson,
    Url,
    client,
    error_message,
    fail,
    get,
    json_or_fail,
    print_json,
    say,
    visible,
)

commands = typer.Typer()


@commands.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    reload: Annotated[bool, typer.Option(help="Restart when the code changes (development).")] = False,
) -> None:
    """Start the MiniVault API (the same as `make run`), with the connection guards (app/web/connections.py)."""
    import uvicorn

    from app.web.connections import PROTOCOL_PATH

    uvicorn.run("app.main:app", host=host, port=port, reload=reload, http=PROTOCOL_PATH)


@commands.command()
def health(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Show whether MiniVault, its backend and its log are working."""
    body = get(url, api_key, "/health")
    if as_json:
        print_json(body)
        return
    backend = body["backend"]
    reachable = "reachable" if backend["reachable"] else "NOT reachable"
    available = "available" if backend["model_available"] else "NOT available"
    typer.echo(f"MiniVault {body['version']}: {body['status']}")
    # /health names no upstream URL (it is open to anyone): the backend, and with several hosts their labels.
    typer.echo(f"backend {backend['name']}: {reachable}")
    for host in body.get("hosts", []):
        why = f" ({host['reason']})" if host.get("reason") else ""
        models = len(host["models"])
        say(f"  {host['host']}: {host['state']}, {models} models, {host['in_flight']} in flight{why}")
    say(f"model {backend['model']}: {available}")
    typer.echo(f"log: {body['log']}")


@commands.command()
def models(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List the models the backend has."""
    body = get(url, api_key, "/models")
    if as_json:
        print_json(body)
        return
    width = max((len(model["name"]) for model in body["models"]), default=4)
    for model in body["models"]:
        marker = "*" if model["name"] == body["default"] else " "
        say(f"{marker} {model['name']:<{width}}  {_size(model.get('size'))}")


def _size(size: int | None) -> str:
    if not size:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


@commands.command()
def pull(
    model: Annotated[str, typer.Argument(help="The model to download, e.g. tinyllama:1.1b-chat.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a model into Ollama, with a progress bar per layer."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TaskProgressColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())  # fmt: skip
    outcome: dict[str, Any] | None = None
    with client(url, api_key, read_timeout=600) as opened, Progress(*columns, console=Console()) as progress:
        layers: dict[str, TaskID] = {}
        with connect_sse(opened, "POST", "/models/pull", json={"model": model}) as source:
            if not source.response.is_success:
                source.response.read()
                progress.stop()
                json_or_fail(source.response)
            for event in source.iter_sse():
                data = json.loads(event.data)
                digest, total = data.get("digest"), data.get("total")
                if event.event in ("done", "error"):
                    outcome = {"event": event.event, **data}
                    break
                if digest and total:
                    if digest not in layers:
                        layers[digest] = progress.add_task(digest.removeprefix("sha256:")[:12], total=total)
                    progress.update(layers[digest], completed=data.get("completed") or 0)
                else:
                    progress.console.print(visible(data.get("status", "")), markup=False, highlight=False)
    if outcome is None:
        fail("the pull ended without reporting success")
    if outcome["event"] == "error":
        fail(error_message(outcome, 200))
    typer.echo(f"pulled {model}")
