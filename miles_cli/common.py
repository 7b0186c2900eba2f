"""What every subcommand shares: recipe + `--set` loading, error mapping, rich console.

Errors: a `MilesError` (bad input) prints one red line and exits with code 2; so does an
`OSError` naming a path (permission, not a folder, disk full). `--debug` (before or after the
subcommand) prints the traceback first and keeps the exit code. Ctrl-C exits 130 and SIGTERM 143,
each with one line, whatever exception the interrupted code turned the signal into; writers
clean their temporaries on the way out. A `graceful` command (`miles train`) is only asked to
stop by the first signal (`Run.stop_requested`: it finishes the step and saves); a second one
interrupts at once. Heavy libraries are imported inside commands, never here.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from miles_core.errors import MilesError

console = Console()
err_console = Console(stderr=True)
_PATH_ERRNOS = {"EACCES", "EPERM", "EROFS", "EISDIR", "ENOTDIR", "EEXIST", "ENOENT", "ENAMETOOLONG", "ELOOP"}


class State:
    debug = False


def _set_debug(value: bool) -> None:
    if value:
        State.debug = True


RecipeOption = Annotated[str, typer.Option("--recipe", "-r", help="Recipe name (see `miles recipes list`) or path to a .toml file.")]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe value: section.key=value (TOML literal). Repeatable."),
]
DebugOption = Annotated[bool, typer.Option("--debug", callback=_set_debug, expose_value=False, is_eager=True,
                                           help="Show full tracebacks for errors.")]


@dataclass
class Run:
    """What a command tells the error handler: where its partial output is, if anywhere."""

    partial: Path | None = None
    resume_hint: str | None = None
    """The command line that continues the run, printed after a signal."""
    signals: list[int] = field(default_factory=list)

    def stop_requested(self) -> bool:
        """Whether a signal asked the command to stop (graceful mode)."""
        return bool(self.signals)


class _ConsoleHandler(logging.Handler):
    """Messages of the core library (logger `miles`) as one yellow line on stderr: `note:` for
    information (a stale temporary removed), `warning:` for warnings (prompts skipped)."""

    def emit(self, record: logging.LogRecord) -> None:
        kind = "note" if record.levelno < logging.WARNING else record.levelname.lower()
        err_console.print(f"[yellow]{kind}:[/] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def cli_errors(graceful: bool = False) -> Iterator[Run]:
    """Map user errors to one line + exit code 2, Ctrl-C to 130, SIGTERM to 143; show the core
    library's warnings (logger `miles`) as `warning:` lines. `graceful`: see the module doc."""
    run = Run()
    signals = run.signals
    handler, logger = _ConsoleHandler(logging.INFO), logging.getLogger("miles")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    with _catch_signals(signals, graceful):
        try:
            yield run
        except BaseException as err:  # noqa: BLE001 - every exit path is mapped below
            if isinstance(err, typer.Exit) and not signals:
                raise
            _report(err, signals, run)
            raise
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)


def _report(err: BaseException, signals: list[int], run: Run) -> None:
    if signals:  # whatever the code turned the signal into (KeyboardInterrupt, ValueError, ...)
        term = signals[0] == signal.SIGTERM
        where = f"; partial output in '{run.partial}'" if run.partial is not None and run.partial.exists() else ""
        where += f"; resume with: {run.resume_hint}" if run.resume_hint and where else ""
        err_console.print(f"[yellow]{'terminated' if term else 'interrupted'}[/]{escape(where)}", highlight=False)
        raise typer.Exit(143 if term else 130) from None
    if isinstance(err, KeyboardInterrupt):
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    if isinstance(err, MilesError):
        _fail(str(err), 2)
    if isinstance(err, OSError) and err.filename is not None:
        code = 2 if err.errno is not None and _errno_name(err.errno) in _PATH_ERRNOS else 1
        _fail(f"{err.strerror or err}: '{err.filename}'", code)


def _fail(message: str, code: int) -> None:
    if State.debug:
        err_console.print_exception(show_locals=False)
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


def _errno_name(number: int) -> str:
    import errno

    return errno.errorcode.get(number, "")


@contextlib.contextmanager
def _catch_signals(signals: list[int], graceful: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt once and are recorded; repeats are ignored so
    that cleanup (removing a half-written temp folder) can finish. `graceful`: the first signal
    is only recorded (the command polls it), the second raises."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if graceful and len(signals) == 1:
            signals.append(signum)
            raise KeyboardInterrupt
        if not signals:
            signals.append(signum)
            if graceful:
                err_console.print("[yellow]stopping after the current step, with a checkpoint; a second signal "
                                  "stops at once[/]", highlight=False)
                return
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def print_table(table) -> None:
    """Print a rich table whose cells wrap onto more lines when the terminal is narrow, never
    cut with an ellipsis: a number such as 1.118e-03 must not read as 1.118."""
    for column in table.columns:
        column.overflow = "fold"
    console.print(table)


def load_cli_config(recipe: str, overrides: list[str] | None):
    from miles_core.config import load_config

    return load_config(recipe, overrides or [])


def progress_bar(*extra_columns, remaining: bool = False):
    """The rich progress bar every long command shows: description, bar, done/total, elapsed
    (and `remaining`), with `extra_columns` (e.g. the last reward) before the times."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    times = (TimeElapsedColumn(), TimeRemainingColumn()) if remaining else (TimeElapsedColumn(),)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *extra_columns,
                    *times, console=console)


@contextlib.contextmanager
def staged_progress() -> Iterator:
    """A progress bar with one task per stage; yields `on_progress(stage, done, total)` for the
    core functions that report stages (convert, quantize). A total of 0 means unknown."""
    with progress_bar() as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total or None)
            progress.update(tasks[stage], completed=done, total=total or None)

        yield on_progress
