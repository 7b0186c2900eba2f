"""`math` reward: the response's final answer is mathematically equal to the label (math-verify).

Both sides go through `math_verify.parse` and are compared with `math_verify.verify(gold,
answer)`, so `\\frac{1}{2}`, `0.5` and `1/2` agree. A bare label such as `\\frac12` or `x^2+1`
is not recognised by `parse` without math delimiters, so a label that parses to nothing is
parsed again inside `$...$`.

Timeouts: math-verify bounds each parse/compare with `signal.alarm`, which only works in the
main thread (elsewhere `parse` raises ValueError). We pass the timeouts only in the main thread;
in any other thread they are disabled (None), which makes the call thread-safe but unbounded.
In the main thread, math-verify's alarm replaces any alarm already set (a test-timeout plugin,
a watchdog) and then cancels it; we re-arm the outer alarm afterwards with what was left of it.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any, Callable, TypeVar

from miles_core.errors import MilesError
from miles_core.sample import Sample

TIMEOUT_S = 5
"""Per parse and per comparison, in the main thread only (see the module docstring)."""

T = TypeVar("T")


def math_reward(sample: Sample) -> float:
    """1.0 if math-verify finds the response's answer equal to `sample.label`, else 0.0."""
    from math_verify import parse, verify  # imports sympy: ~0.5 s, only when this reward is used

    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold = _parse_label(sample.label, timeout)
    answer = _keeping_outer_alarm(lambda: parse(sample.response, parsing_timeout=timeout))
    return 1.0 if _keeping_outer_alarm(lambda: verify(gold, answer, timeout_seconds=timeout)) else 0.0


def _parse_label(label: Any, timeout: int | None) -> list[Any]:
    from math_verify import parse

    if label is None or isinstance(label, bool):
        raise MilesError(f"math reward needs a str or number label, got {label!r}")
    text = str(label)
    gold = _keeping_outer_alarm(lambda: parse(text, parsing_timeout=timeout))
    if not gold:
        gold = _keeping_outer_alarm(lambda: parse(f"${text}$", parsing_timeout=timeout))
    if not gold:
        raise MilesError(f"math-verify could not parse the label {text!r}")
    return gold


def _keeping_outer_alarm(call: Callable[[], T]) -> T:
    """Run `call`; if an alarm was pending before it, set it again with the time it had left."""
    if not hasattr(signal, "alarm") or threading.current_thread() is not threading.main_thread():
        return call()
    remaining = signal.alarm(0)
    start = time.monotonic()
    try:
        return call()
    finally:
        if remaining:
            signal.alarm(max(1, math.ceil(remaining - (time.monotonic() - start))))
