"""What every subcommand shares: recipe + `--set` loading, error mapping, rich console.

Errors: a `MilesError` (bad input) prints one red line and exits with code 2; `--debug` shows
the traceback instead. Heavy libraries are imported inside commands, never here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from miles_core.errors import MilesError

console = Console()
err_console = Console(stderr=True)


class State:
    debug = False


RecipeOption = Annotated[str, typer.Option("--recipe", "-r", help="Recipe name (see `miles recipes list`) or path to a .toml file.")]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe value: section.key=value (TOML literal). Repeatable."),
]


class _ConsoleHandler(logging.Handler):
    """Warnings of the core library (logger `miles`) as one yellow `warning:` line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(f"[yellow]{record.levelname.lower()}:[/] {escape(record.getMessage())}",
                          highlight=False, soft_wrap=True)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Map user errors to one line + exit code 2; keep tracebacks for `--debug`; show warnings."""
    handler = _ConsoleHandler(logging.WARNING)
    logging.getLogger("miles").addHandler(handler)
    try:
        yield
    except MilesError as err:
        if State.debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    finally:
        logging.getLogger("miles").removeHandler(handler)


def load_cli_config(recipe: str, overrides: list[str] | None):
    from miles_core.config import load_config

    return load_config(recipe, overrides or [])
