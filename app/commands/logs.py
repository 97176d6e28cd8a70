"""`minivault logs`: the last exchanges, following new ones, searching, and rebuilding the history database.

The log readers (app.exchanges.reader) are imported where they are used: they bring in pydantic,
which would add a tenth of a second to every `minivault "prompt"`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, get_args

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from app.commands.common import (
    DEFAULT_URL,
    ApiKey,
    AsJson,
    LogPath,
    Url,
    fail,
    json_or_fail,
    json_text,
    open_client,
    say,
    visible,
)

commands = typer.Typer(
    help="Read the interaction log (logs/log.jsonl and its rotated files): the last lines, following, searching, "
    "or rebuilding the history database from it."
)

DEFAULT_LOG = Path("logs/log.jsonl")
DbPath = Annotated[
    Path | None,
    typer.Option(
        "--db", envvar="MINIVAULT_DB_PATH", dir_okay=False,
        help="The history database to fill; by default minivault.db beside the log, as the server keeps it.",
    ),
]  # fmt: skip
_PAGE = 100  # results asked of GET /history at a time
_CHUNK = 1000  # records per database transaction in reindex


@commands.callback(invoke_without_command=True)
def logs(
    ctx: typer.Context,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many of the last lines to show.")] = 10,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines as they are written.")
    ] = False,
    as_json: AsJson = False,
    path: LogPath = DEFAULT_LOG,
) -> None:
    """Show the last lines of the interaction log (`minivault logs -n 20 --follow`)."""
    if ctx.invoked_subcommand is not None:
        return
    from app.exchanges.reader import follow as follow_log
    from app.exchanges.reader import last_lines, log_files

    if not log_files(path) and not follow:
        _no_log(path)
    last, end = last_lines(path, lines)
    for line in last:
        _print_line(line, as_json)
    if follow:
        try:
            for line in follow_log(path, end):
                _print_line(line, as_json)
        except KeyboardInterrupt:
            pass


@dataclass(slots=True, frozen=True)
class _Filters:
    model: str | None
    status: str | None
    endpoint: str | None
    since: datetime | None
    until: datetime | None

    def params(self) -> dict[str, str]:
        values = {"model": self.model, "status": self.status, "endpoint": self.endpoint}
        values |= {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }
        return {name: value for name, value in values.items() if value is not None}

    def match(self, record: dict[str, Any]) -> bool:
        wanted = {"model": self.model, "status": self.status, "endpoint": self.endpoint}
        if any(value is not None and record.get(name) != value for name, value in wanted.items()):
            return False
        if self.since is None and self.until is None:
            return True
        ts = _parse_time(str(record.get("ts")))
        if ts is None:
            return False
        return (self.since is None or ts >= self.since) and (self.until is None or ts < self.until)


def _parse_time(text: str) -> datetime | None:
    """An ISO 8601 date or time; without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _one_of(literal: str) -> Callable[[str | None], str | None]:
    """A parser accepting the values of app.schemas' `literal`, the API's own list, so the two never drift.

    app.schemas is imported only when the option is given: it brings in pydantic (see the module's docstring).
    """

    def parse(value: str | None) -> str | None:
        if value is None:
            return None
        from app import schemas

        allowed = get_args(getattr(schemas, literal))
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of: {', '.join(allowed)}")
        return value

    return parse


def _time_option(value: str | None) -> datetime | None:
    if value is None:
        return None
    moment = _parse_time(value)
    if moment is None:
        raise typer.BadParameter(f"{value!r} is not an ISO date or time (like 2025-01-31 or 2025-01-31T14:00:00Z)")
    return moment


Since = Annotated[
    datetime | None,
    typer.Option(
        parser=_time_option, metavar="<time>", help="Only exchanges at or after this ISO time (UTC if no zone)."
    ),
]
Until = Annotated[
    datetime | None,
    typer.Option(parser=_time_option, metavar="<time>", help="Only exchanges before this ISO time (UTC if no zone)."),
]


@commands.command()
def search(
    text: Annotated[
        str, typer.Argument(help="Words to find (full-text via the API; a case-insensitive substring in the files).")
    ],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only this model.")] = None,
    status: Annotated[
        str | None,
        typer.Option(
            parser=_one_of("Status"),
            metavar="<status>",
            help="Only this outcome, as the log and the API name it (a wrong one is refused with the list).",
        ),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(
            parser=_one_of("Endpoint"),
            metavar="<endpoint>",
            help="Only this endpoint, as the log and the API name it (a wrong one is refused with the list).",
        ),
    ] = None,
    since: Since = None,
    until: Until = None,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="Show at most N matches.")] = 50,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
    path: LogPath = DEFAULT_LOG,
) -> None:
    """Print the exchanges that mention TEXT.

    Asks MiniVault's history search when it is reachable at --url (best matches first), else reads the log
    files (the last N matches, oldest first); stderr says which."""
    filters = _Filters(model, status, endpoint, since, until)
    records = _search_api(url, api_key, text, filters, lines)
    if records is None:
        records = _search_files(path, text, filters, lines)
    if not records:
        fail(f"no exchange mentions {text!r}")
    for record in records:
        _print_record(record, as_json)


def _search_api(url: str, api_key: str | None, text: str, filters: _Filters, limit: int) -> list[dict[str, Any]] | None:
    """Up to `limit` matches from GET /history (following its cursor), or None when there is no such API at `url`."""
    params: dict[str, str | int] = {"q": text, **filters.params(), "limit": min(limit, _PAGE)}
    items: list[dict[str, Any]] = []
    with open_client(url, api_key, read_timeout=30) as client:
        try:
            response = client.get("/history", params=params)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            typer.echo(f"minivault: MiniVault is not reachable at {url}; searching the log files", err=True)
            return None
        except httpx.HTTPError as exc:
            fail(f"the connection to MiniVault at {url} failed: {exc}")
        if response.status_code == 404 and _error_code(response) == "route_not_found":
            typer.echo(f"minivault: MiniVault at {url} has no history API; searching the log files", err=True)
            return None
        typer.echo(f"minivault: searching the history of MiniVault at {url}", err=True)
        while True:
            page = json_or_fail(response)
            items.extend(page["items"])
            cursor = page.get("next_cursor")
            if cursor is None or len(items) >= limit:
                return items[:limit]
            params.update(cursor=cursor, limit=min(limit - len(items), _PAGE))
            try:
                response = client.get("/history", params=params)
            except httpx.HTTPError as exc:
                fail(f"the connection to MiniVault at {url} failed: {exc}")


def _error_code(response: httpx.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _search_files(path: Path, text: str, filters: _Filters, limit: int) -> list[dict[str, Any]]:
    from app.exchanges.reader import log_files, read_dicts

    if not log_files(path):
        _no_log(path)
    needle = text.casefold()
    return [
        record for record in read_dicts(path, _warn_skipped) if filters.match(record) and needle in _searchable(record)
    ][-limit:]


def _searchable(record: dict[str, Any]) -> str:
    error = record.get("error") or {}
    fields = (record.get("id"), record.get("prompt"), record.get("response"), record.get("model"), error.get("message"))
    return "\n".join(str(field) for field in fields if field).casefold()


@commands.command()
def reindex(path: LogPath = DEFAULT_LOG, db: DbPath = None) -> None:
    """Rebuild the history database from the log and its rotated files.

    Records already in the database (by id) are left as they are, so running it again adds nothing."""
    from app.exchanges.reader import log_files, read_records
    from app.store.sqlite_history import SqliteHistory

    files = log_files(path)
    if not files:
        _no_log(path)
    total = sum(_size(file) for file in files)
    db = db or path.parent / "minivault.db"
    read = new = skipped = bytes_read = 0
    columns = (TextColumn("reindexing"), BarColumn(), DownloadColumn(), TaskProgressColumn(), TimeRemainingColumn())
    history = SqliteHistory(db, keep_text=True)
    try:
        with Progress(*columns, console=Console(stderr=True)) as progress:
            task = progress.add_task("reindex", total=total)

            def skip(line: bytes) -> None:
                nonlocal skipped
                skipped += 1
                message = _skipped_message(line, "an exchange record")
                progress.console.print(message, markup=False, highlight=False, soft_wrap=True)

            def count(size: int) -> None:
                nonlocal bytes_read
                bytes_read += size

            chunk = []
            for record in read_records(path, skip, count):
                chunk.append(record)
                if len(chunk) == _CHUNK:
                    new += history.add_many(chunk)
                    read += len(chunk)
                    chunk = []
                    progress.update(task, completed=bytes_read)
            new += history.add_many(chunk) if chunk else 0
            read += len(chunk)
            progress.update(task, total=max(total, bytes_read), completed=bytes_read)
    finally:
        history.close()
    typer.echo(f"{read} records read, {new} new, {skipped} lines skipped")


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except FileNotFoundError:
        return 0


def _no_log(path: Path) -> NoReturn:
    fail(f"no interaction log at {path} yet (set --path or MINIVAULT_LOG_PATH)")


def _skipped_message(line: bytes, expected: str = "JSON") -> str:
    """A torn line (a killed writer) or a foreign one: said on stderr, and the reading goes on."""
    shown = line.rstrip(b"\r\n")[:80]
    return f"minivault: skipping a line that is not {expected}: {shown!r}"


def _warn_skipped(line: bytes) -> None:
    typer.echo(_skipped_message(line), err=True)


def _print_line(line: bytes, as_json: bool) -> None:
    from app.exchanges.reader import parse_line

    record = parse_line(line)
    if record is None:
        _warn_skipped(line)
    else:
        _print_record(record, as_json)


def _print_record(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json_text(record))
        return
    latency = record.get("latency_ms")
    status = record.get("status", "?")
    if record.get("error"):
        status += f" ({record['error'].get('code')})"
    # Every field is as the log holds it, which is what clients sent: control characters are shown, not obeyed.
    say(
        f"{record.get('ts', '?')}  {record.get('id', '?')}  {record.get('endpoint', '?')}  {status}  "
        f"{record.get('backend', '?')}/{record.get('model', '?')}  "
        f"{'-' if latency is None else f'{latency:.0f} ms'}  {record.get('completion_tokens') or 0} tok"
    )
    # _clip has shown the control characters already (so the width counts what is printed).
    typer.echo(f"  > {_clip(record.get('prompt'))}")
    typer.echo(f"  < {_clip(record.get('response'))}")
    calls = record.get("tool_calls")
    # A tool call is often the whole answer: shown as name(arguments), arguments as the model wrote them.
    for call in calls if isinstance(calls, list) else ():
        if isinstance(call, dict):
            shown = f"{call.get('name')}({call.get('arguments') or ''})"
            typer.echo(f"  < {_clip(shown)}")


def _clip(text: object, width: int = 100) -> str:
    flat = visible(" ".join(str(text or "").split()))
    return flat if len(flat) <= width else flat[: width - 1] + "…"
