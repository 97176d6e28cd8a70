"""minivault: prompt a running MiniVault from the shell, chat with it, and look after it (serve, health, models,
pull, logs).

`python app/cli.py "prompt"`, `python -m app.cli "prompt"` and (after `pip install -e .`)
`minivault "prompt"` are the same program. Exit codes: 0 ok, 1 the request failed,
2 usage error, 3 MiniVault could not be reached. The commands live in app/commands/.
"""

import sys

if not __package__:
    # `python app/cli.py` puts app/ itself first on sys.path; the package imports need the repo root.
    from pathlib import Path as _Path

    sys.path[0] = str(_Path(__file__).resolve().parent.parent)

try:
    import typer
    from typer import _click  # typer vendors click (0.29+): TyperGroup.parse_args takes its Context
    from typer.core import TyperGroup

    from app.commands import chat, generate, logs, server
except ModuleNotFoundError as _missing:
    if (_missing.name or "app").partition(".")[0] == "app":
        raise
    # The brief's `python app/cli.py "..."` with a Python that lacks the dependencies (no virtualenv active).
    sys.stderr.write(
        f"minivault: {sys.executable} has no {_missing.name!r} module: run `make run` (or `make test`) once to set "
        "up .venv, then use `.venv/bin/python app/cli.py ...`, `.venv/bin/minivault ...` (installed by `make test`) "
        "or `source .venv/bin/activate` first\n"
    )
    raise SystemExit(2) from None


class _PromptFirst(TyperGroup):
    """A first word that is not a command is a prompt: `minivault "hi"` runs `minivault generate "hi"`."""

    def parse_args(self, ctx: _click.Context, args: list[str]) -> list[str]:
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
# One line per module of app/commands/: an unnamed group adds its commands at the top level.
cli.add_typer(generate.commands)
cli.add_typer(server.commands)
cli.add_typer(logs.commands, name="logs")
cli.add_typer(chat.commands)


def main() -> None:
    """Console-script entry point (`minivault`)."""
    cli()


if __name__ == "__main__":
    main()
