"""User-facing errors: one clear line naming the bad value and what was expected.

Anything raised as `MilesError` is a problem with the user's input (recipe, data, checkpoint,
flags). The CLI prints its message on one line and exits with code 2; other exceptions are
bugs and keep their traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MilesError(Exception):
    """A bad input, reported to the user as one line (exit code 2 in the CLI)."""


class Refused(MilesError):
    """A server refused a request with a 4xx `status` (its one-line reason is the message)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RunStopped(Exception):
    """A run stopped between steps because it was asked to (a signal); `checkpoint` is where it
    can resume from (None when no step had finished since the last one)."""

    def __init__(self, step: int, checkpoint: object | None) -> None:
        super().__init__(f"stopped before step {step}")
        self.step, self.checkpoint = step, checkpoint


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Suffix like " (did you mean 'temperature'?)" or "" when nothing is close."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_of(kind: str, value: str, choices: Iterable[str]) -> MilesError:
    """Error for a value outside a closed set, listing the set and the closest match."""
    choices = sorted(choices)
    return MilesError(
        f"unknown {kind} '{value}'{did_you_mean(value, choices)}; expected one of: {', '.join(choices)}"
    )
