"""Rewards that extract one answer from the response and compare it exactly with the label.

`boxed`: the content of the LAST `\\boxed{...}` (braces balanced, so `\\boxed{\\frac{1}{2}}`
yields `\\frac{1}{2}`), compared as text after light normalisation (whitespace and `$`
removed, trailing `.` dropped). A label that itself contains `\\boxed{}` is unwrapped the same
way. A response whose last `\\boxed{` is never closed (cut off, say) scores 0.

`last_number`: the last number in the response (optional sign, decimals, thousands commas as
in `1,000`) compared numerically with the label's last number, so `5`, `5.0` and `+5` agree.
A `-` that reads as subtraction is not a sign: `7 - 2` and `7-2` give 2, `is -2` gives -2.
Meant for small-model arithmetic tasks, where the answer is the last thing written.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from miles_core.errors import MilesError
from miles_core.sample import Sample

_BOXED = re.compile(r"\\boxed\s*\{")
# A sign only where it cannot be a binary operator: not right after a digit, letter or `)`
# (`7-2`, `COVID-19`) nor one space after a digit or `)` (`7 - 2`), yet `is -5` keeps it.
# Thousands groups need exactly three digits, so `1,2,3` is three numbers.
_NUMBER = re.compile(r"(?:(?<![\w)])(?<![\d)] )[-+])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def boxed_reward(sample: Sample) -> float:
    """1.0 if the last `\\boxed{}` of the response equals the label after normalisation."""
    label = _label_text(sample.label)
    answer = last_boxed(sample.response)
    if answer is None:
        return 0.0
    return 1.0 if _normalise(answer) == _normalise(last_boxed(label) or label) else 0.0


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces, or None if there is none."""
    starts = [match.end() for match in _BOXED.finditer(text)]
    # Only the last one counts: an earlier box the model moved on from is not its answer.
    return _balanced_content(text, starts[-1]) if starts else None


def _balanced_content(text: str, start: int) -> str | None:
    """Text from `start` up to the `}` that closes the `{` just before it; None if unclosed."""
    depth = 1
    for pos in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            return text[start:pos]
    return None


def _normalise(answer: str) -> str:
    return re.sub(r"\s+", "", answer).replace("$", "").rstrip(".")


def last_number_reward(sample: Sample) -> float:
    """1.0 if the response's last number equals the label's number, else 0.0."""
    expected = _label_number(sample.label)
    found = last_number(sample.response)
    return 1.0 if found is not None and found == expected else 0.0


def last_number(text: str) -> Decimal | None:
    """The last number written in `text` (`-1,234.5` -> Decimal('-1234.5')), or None."""
    matches = _NUMBER.findall(text)
    return Decimal(matches[-1].replace(",", "")) if matches else None


def _label_number(label: Any) -> Decimal:
    if isinstance(label, (int, float)) and not isinstance(label, bool):
        return Decimal(str(label))
    number = last_number(_label_text(label))
    if number is None:
        raise MilesError(f"last_number reward needs a label with a number, got {label!r}")
    return number


def _label_text(label: Any) -> str:
    if isinstance(label, (str, int, float)) and not isinstance(label, bool):
        return str(label)
    raise MilesError(f"expected a str or number label, got {label!r}")
