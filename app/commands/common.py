"""What every command shares: options, the HTTP client for MiniVault, errors and exit codes."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
DEFAULT_URL = "http://localhost:8000"

Url = Annotated[str, typer.Option("--url", envvar="MINIVAULT_URL", help="Where MiniVault listens.")]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="MINIVAULT_API_KEY", help="A key from the server's MINIVAULT_API_KEYS."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
LogPath = Annotated[
    Path, typer.Option("--path", envvar="MINIVAULT_LOG_PATH", help="The interaction log file.", dir_okay=False)
]


# What a terminal acts on instead of showing: the C0 controls but newline and tab, DEL and the C1 controls
# (ESC starts sequences that retitle the window, clear the screen or move the cursor; U+009B is a one-character
# CSI). Text from the server or the log (a prompt, a model's answer, an error message) is printed with them
# as visible `\xNN`, and JSON output keeps its values exactly, with `\u00NN` for those json.dumps leaves raw.
_SHOWN = {code: f"\\x{code:02x}" for code in (*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))}
_JSON_SHOWN = {code: f"\\u{code:04x}" for code in range(0x7F, 0xA0)}


def visible(text: str) -> str:
    """`text` safe to print on a terminal: control characters other than newline and tab shown as `\\xNN`."""
    return text.translate(_SHOWN)


def json_text(value: Any, indent: int | None = None) -> str:
    """`value` as JSON safe to print on a terminal: every control character escaped, the values unchanged."""
    return json.dumps(value, ensure_ascii=False, indent=indent).translate(_JSON_SHOWN)


def say(text: str, *, nl: bool = True, err: bool = False) -> None:
    """Print text that came from the server or the log, control characters made visible."""
    typer.echo(visible(text), nl=nl, err=err)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    """End the program with one line on stderr (the message may quote the server, so it is made visible)."""
    say(f"minivault: {message}", err=True)
    raise typer.Exit(code)


def unreachable_message(url: str) -> str:
    return (
        f"cannot reach MiniVault at {url}: start it with `make run` (or `python app/cli.py serve`), "
        "or point --url / MINIVAULT_URL at it"
    )


@contextmanager
def client(url: str, api_key: str | None, read_timeout: float | None = 300.0) -> Iterator[httpx.Client]:
    """An httpx client for MiniVault whose transport failures end the program with exit code 3 or 1."""
    try:
        with open_client(url, api_key, read_timeout) as opened:
            yield opened
    except httpx.ConnectError:
        fail(unreachable_message(url), EXIT_UNREACHABLE)
    except httpx.TimeoutException:
        fail(f"MiniVault at {url} did not answer in time")
    except httpx.HTTPError as exc:
        fail(f"the connection to MiniVault at {url} failed: {exc}")


def open_client(url: str, api_key: str | None, read_timeout: float | None = 300.0) -> httpx.Client:
    """The bare client (transport errors raise): for callers that have a fallback."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, read=read_timeout), headers=headers)


def error_message(body: Any, status: int) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        if error.get("code") == "unauthorized":
            return f"unauthorized: {error['message']}; pass it with --api-key or MINIVAULT_API_KEY"
        return f"{error.get('code', 'error')}: {error['message']}"
    return f"MiniVault answered HTTP {status}"


def json_or_fail(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not response.is_success:
        fail(error_message(body, response.status_code))
    return body


def get(url: str, api_key: str | None, path: str) -> Any:
    with client(url, api_key, read_timeout=30) as opened:
        return json_or_fail(opened.get(path))


def print_json(value: Any) -> None:
    typer.echo(json_text(value, indent=2))
