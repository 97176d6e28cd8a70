"""minivault: prompt a running MiniVault from the shell, and look after it (serve, health, models, pull, logs).

`python app/cli.py "prompt"`, `python -m app.cli "prompt"` and (after `pip install -e .`)
`minivault "prompt"` are the same program. Exit codes: 0 ok, 1 the request failed,
2 usage error, 3 MiniVault could not be reached.
"""

import sys

if not __package__:
    # `python app/cli.py` puts app/ itself first on sys.path; the package imports need the repo root.
    from pathlib import Path as _Path

    sys.path[0] = str(_Path(__file__).resolve().parent.parent)

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import httpx
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
from typer.core import TyperGroup

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
DEFAULT_URL = "http://localhost:8000"


class _PromptFirst(TyperGroup):
    """A first word that is not a command is a prompt: `minivault "hi"` runs `minivault generate "hi"`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["generate", *args]
        return super().parse_args(ctx, args)


cli = typer.Typer(
    cls=_PromptFirst,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    help='Talk to MiniVault. `minivault "prompt"` is short for `minivault generate "prompt"`; '
    'a prompt that is also a command name needs the long form: `minivault generate "models"`.',
)
logs_cli = typer.Typer(help="Read the interaction log (logs/log.jsonl): the last lines, following, or searching.")
cli.add_typer(logs_cli, name="logs")

Url = Annotated[str, typer.Option("--url", envvar="MINIVAULT_URL", help="Where MiniVault listens.")]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="MINIVAULT_API_KEY", help="A key from the server's MINIVAULT_API_KEYS."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
LogPath = Annotated[
    Path, typer.Option("--path", envvar="MINIVAULT_LOG_PATH", help="The interaction log file.", dir_okay=False)
]


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    typer.echo(f"minivault: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _client(url: str, api_key: str | None, read_timeout: float | None = 300.0) -> Iterator[httpx.Client]:
    """An httpx client for MiniVault whose transport failures end the program with exit code 3 or 1."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    timeout = httpx.Timeout(10.0, read=read_timeout)
    try:
        with httpx.Client(base_url=url, timeout=timeout, headers=headers) as client:
            yield client
    except httpx.ConnectError:
        _fail(
            f"cannot reach MiniVault at {url}: start it with `make run` (or `python app/cli.py serve`), "
            "or point --url / MINIVAULT_URL at it",
            EXIT_UNREACHABLE,
        )
    except httpx.TimeoutException:
        _fail(f"MiniVault at {url} did not answer in time")
    except httpx.HTTPError as exc:
        _fail(f"the connection to MiniVault at {url} failed: {exc}")


def _error_message(body: Any, status: int) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        if error.get("code") == "unauthorized":
            return f"unauthorized: {error['message']}; pass it with --api-key or MINIVAULT_API_KEY"
        return f"{error.get('code', 'error')}: {error['message']}"
    return f"MiniVault answered HTTP {status}"


def _json_or_fail(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not response.is_success:
        _fail(_error_message(body, response.status_code))
    return body


def _get(url: str, api_key: str | None, path: str) -> Any:
    with _client(url, api_key, read_timeout=30) as client:
        return _json_or_fail(client.get(path))


def _parse_options(pairs: list[str]) -> dict[str, Any]:
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


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, ensure_ascii=False, indent=2))


@cli.command()
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
        body["options"] = _parse_options(option)
    if stream is None:
        stream = sys.stdout.isatty() and not as_json
    with _client(url, api_key) as client:
        if stream:
            done = _stream_answer(client, body)
            if as_json:
                _print_json(done)
            return
        result = _json_or_fail(client.post("/generate", json=body))
    if as_json:
        _print_json(result)
    else:
        typer.echo(result["response"])


def _stream_answer(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    with connect_sse(client, "POST", "/generate", json={**body, "stream": True}) as source:
        if not source.response.is_success:
            source.response.read()
            _json_or_fail(source.response)
        for event in source.iter_sse():
            data = json.loads(event.data)
            if event.event == "token":
                typer.echo(data["content"], nl=False)
            elif event.event == "done":
                typer.echo()
                return data
            elif event.event == "error":
                typer.echo()
                _fail(_error_message(data, 200))
    _fail("the stream ended without a final event")


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    reload: Annotated[bool, typer.Option(help="Restart when the code changes (development).")] = False,
) -> None:
    """Start the MiniVault API (the same as `make run`)."""
    import uvicorn

    uvicorn.run("app.main:app", host=host, port=port, reload=reload)


@cli.command()
def health(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Show whether MiniVault, its backend and its log are working."""
    body = _get(url, api_key, "/health")
    if as_json:
        _print_json(body)
        return
    backend = body["backend"]
    reachable = "reachable" if backend["reachable"] else "NOT reachable"
    available = "available" if backend["model_available"] else "NOT available"
    typer.echo(f"MiniVault {body['version']}: {body['status']}")
    typer.echo(f"backend {backend['name']} at {backend['url']}: {reachable}")
    typer.echo(f"model {backend['model']}: {available}")
    typer.echo(f"log: {body['log']}")


@cli.command()
def models(url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List the models the backend has."""
    body = _get(url, api_key, "/models")
    if as_json:
        _print_json(body)
        return
    width = max((len(model["name"]) for model in body["models"]), default=4)
    for model in body["models"]:
        marker = "*" if model["name"] == body["default"] else " "
        typer.echo(f"{marker} {model['name']:<{width}}  {_size(model.get('size'))}")


def _size(size: int | None) -> str:
    if not size:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


@cli.command()
def pull(
    model: Annotated[str, typer.Argument(help="The model to download, e.g. tinyllama:1.1b-chat.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a model into Ollama, with a progress bar per layer."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TaskProgressColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())  # fmt: skip
    outcome: dict[str, Any] | None = None
    with _client(url, api_key, read_timeout=600) as client, Progress(*columns, console=Console()) as progress:
        layers: dict[str, TaskID] = {}
        with connect_sse(client, "POST", "/models/pull", json={"model": model}) as source:
            if not source.response.is_success:
                source.response.read()
                progress.stop()
                _json_or_fail(source.response)
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
                    progress.console.print(data.get("status", ""))
    if outcome is None:
        _fail("the pull ended without reporting success")
    if outcome["event"] == "error":
        _fail(_error_message(outcome, 200))
    typer.echo(f"pulled {model}")


@logs_cli.callback(invoke_without_command=True)
def logs(
    ctx: typer.Context,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many of the last lines to show.")] = 10,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines as they are written.")
    ] = False,
    as_json: AsJson = False,
    path: LogPath = Path("logs/log.jsonl"),
) -> None:
    """Show the last lines of the interaction log (`minivault logs -n 20 --follow`)."""
    if ctx.invoked_subcommand is not None:
        return
    if not path.exists() and not follow:
        _fail(f"no interaction log at {path} yet (set --path or MINIVAULT_LOG_PATH)")
    last, end = _last_lines(path, lines) if path.exists() else ([], 0)
    for line in last:
        _print_record(line, as_json)
    if follow:
        try:
            for line in _follow(path, end):
                _print_record(line, as_json)
        except KeyboardInterrupt:
            pass


@logs_cli.command()
def search(
    text: Annotated[str, typer.Argument(help="Case-insensitive text to find in prompts, responses, ids and errors.")],
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="Show at most the last N matches.")] = 50,
    as_json: AsJson = False,
    path: LogPath = Path("logs/log.jsonl"),
) -> None:
    """Print the exchanges that mention TEXT."""
    if not path.exists():
        _fail(f"no interaction log at {path} yet (set --path or MINIVAULT_LOG_PATH)")
    needle = text.casefold()
    matches: list[bytes] = []
    with path.open("rb") as file:
        for line in file:
            record = _parse(line)
            if record is None:
                if line.strip():
                    _warn_skipped(line)
            elif needle in _searchable(record):
                matches.append(line)
    if not matches:
        _fail(f"no exchange mentions {text!r}")
    for line in matches[-lines:]:
        _print_record(line, as_json)


def _searchable(record: dict[str, Any]) -> str:
    error = record.get("error") or {}
    fields = (record.get("id"), record.get("prompt"), record.get("response"), record.get("model"), error.get("message"))
    return "\n".join(str(field) for field in fields if field).casefold()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _warn_skipped(line: bytes) -> None:
    """A torn line (a killed writer) or a foreign one: say so on stderr and go on."""
    shown = line.rstrip(b"\r\n")[:80]
    typer.echo(f"minivault: skipping a line that is not JSON: {shown!r}", err=True)


def _print_record(line: bytes, as_json: bool) -> None:
    record = _parse(line)
    if record is None:
        _warn_skipped(line)
        return
    if as_json:
        typer.echo(json.dumps(record, ensure_ascii=False))
        return
    latency = record.get("latency_ms")
    status = record.get("status", "?")
    if record.get("error"):
        status += f" ({record['error'].get('code')})"
    typer.echo(
        f"{record.get('ts', '?')}  {record.get('id', '?')}  {record.get('endpoint', '?')}  {status}  "
        f"{record.get('backend', '?')}/{record.get('model', '?')}  "
        f"{'-' if latency is None else f'{latency:.0f} ms'}  {record.get('completion_tokens') or 0} tok"
    )
    typer.echo(f"  > {_clip(record.get('prompt'))}")
    typer.echo(f"  < {_clip(record.get('response'))}")


def _clip(text: object, width: int = 100) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _last_lines(path: Path, count: int, block: int = 65536) -> tuple[list[bytes], int]:
    """The last `count` lines and the offset they end at, read backwards in blocks so a large log costs little."""
    with path.open("rb") as file:
        file.seek(0, 2)
        end = position = file.tell()
        data = b""
        while count and position > 0 and data.count(b"\n") <= count:
            position = max(0, position - block)
            file.seek(position)
            data = file.read(end - position)
    lines = [line for line in data.splitlines() if line.strip()]
    return (lines[-count:] if count else []), end


def _follow(path: Path, offset: int, interval: float = 0.5) -> Iterator[bytes]:
    """Lines appended after `offset`; survives the file being created, truncated or replaced."""
    inode = path.stat().st_ino if path.exists() else None
    partial = b""
    while True:
        try:
            stat = path.stat()
        except FileNotFoundError:
            time.sleep(interval)
            continue
        if stat.st_ino != inode or stat.st_size < offset:
            inode, offset, partial = stat.st_ino, 0, b""
        if stat.st_size > offset:
            with path.open("rb") as file:
                file.seek(offset)
                chunk = file.read()
            offset += len(chunk)
            *complete, partial = (partial + chunk).split(b"\n")
            yield from (line for line in complete if line.strip())
        else:
            time.sleep(interval)


def main() -> None:
    """Console-script entry point (`minivault`)."""
    cli()


if __name__ == "__main__":
    main()
