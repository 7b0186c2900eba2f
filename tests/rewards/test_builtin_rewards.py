"""Built-in rewards on positive and negative cases."""

from __future__ import annotations

import signal
import threading

import pytest

from miles_core.errors import MilesError
from miles_core.rewards import (
    REWARDS,
    boxed_reward,
    f1_reward,
    last_boxed,
    last_number,
    last_number_reward,
    math_reward,
)
from miles_core.sample import Sample


def _s(response: str, label) -> Sample:
    return Sample(response=response, label=label)


@pytest.mark.parametrize("response, label, expected", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),   # 1/2 == 0.5 symbolically
    ("\\boxed{0.5}", "\\frac12", 1.0),                        # bare LaTeX label: re-parsed inside $...$
    ("3 + 2 = 5", "5", 1.0),                                  # math-verify reads the equation's right side
    ("The answer is 5.", "5", 1.0),
    ("The answer is 5.", 5, 1.0),                             # numeric label
    ("The answer is 6.", "5", 0.0),
    ("\\boxed{x^2 + 1}", "x^2+1", 1.0),
    ("I do not know", "5", 0.0),
])
def test_math(response, label, expected):
    assert math_reward(_s(response, label)) == expected


def test_math_unparseable_label_raises():
    with pytest.raises(MilesError, match="could not parse the label ''"):
        math_reward(_s("5", ""))


def test_math_works_off_the_main_thread():
    # math-verify's default timeouts use SIGALRM, which raises ValueError outside the main thread.
    results = []
    worker = threading.Thread(target=lambda: results.append(math_reward(_s("\\boxed{\\frac{1}{2}}", "0.5"))))
    worker.start()
    worker.join()
    assert results == [1.0]


def test_math_keeps_an_outer_alarm():
    # math-verify arms SIGALRM for its own timeout and cancels it afterwards; an alarm set
    # before the call (a test timeout, a watchdog) must still be pending after it.
    previous = signal.alarm(0)
    try:
        signal.alarm(100)
        assert math_reward(_s("\\boxed{2}", "2")) == 1.0
        assert 95 <= signal.alarm(0) <= 100
    finally:
        signal.alarm(previous)


@pytest.mark.parametrize("response, label, expected", [
    ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),        # nested braces balanced
    ("\\boxed{ 42 }.", "42", 1.0),                            # spaces stripped
    ("$\\boxed{42.}$", "$42$", 1.0),                          # `$` and trailing `.` dropped
    ("\\boxed{1} no wait \\boxed{2}", "2", 1.0),              # the last box counts
    ("\\boxed{2} no wait \\boxed{1}", "2", 0.0),
    ("\\boxed{7}", 7, 1.0),                                   # numeric label
    ("\\boxed{7}", "\\boxed{7}", 1.0),                        # boxed label unwrapped
    ("the answer is 7", "7", 0.0),                            # no box
    ("\\boxed{2} then \\boxed{7", "2", 0.0),                  # last box cut off
])
def test_boxed(response, label, expected):
    assert boxed_reward(_s(response, label)) == expected


def test_last_boxed():
    assert last_boxed("\\boxed{a{b}c} and \\boxed {d}") == "d"
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("nothing") is None


@pytest.mark.parametrize("response, label, expected", [
    ("Barack Obama", "barack obama", 1.0),
    ("The Eiffel Tower!", "eiffel tower", 1.0),               # article and punctuation removed
    # pred [paris, france], ref [paris]: 1 common, P = 1/2, R = 1, F1 = 2 * .5 * 1 / 1.5 = 2/3
    ("Paris, France", "Paris", 2 / 3),
    ("London", "Paris", 0.0),
    ("Paris", ["London", "paris"], 1.0),                      # best of several references
    ("1999", 1999, 1.0),
])
def test_f1(response, label, expected):
    assert f1_reward(_s(response, label)) == pytest.approx(expected)


@pytest.mark.parametrize("response, label, expected", [
    ("3 + 4 = 7", "7", 1.0),
    ("The total is 1,000.", 1000, 1.0),                       # thousands comma, trailing period
    ("It is -12.50", "-12.5", 1.0),                           # numeric, not textual, equality
    ("x = -3", -3, 1.0),
    ("7 - 2", "5", 0.0),                                      # last number is 2, not -2 nor 5
    ("5 apples, then 6", "5", 0.0),                           # only the last number counts
    ("no digits here", "5", 0.0),
    ("#### 42", "Answer: #### 42", 1.0),                      # label's own last number
])
def test_last_number(response, label, expected):
    assert last_number_reward(_s(response, label)) == expected


def test_last_number_parsing():
    assert str(last_number("7-2")) == "2"
    assert str(last_number("is -5")) == "-5"
    assert str(last_number("-1,234.5")) == "-1234.5"
    assert str(last_number("1,2,3")) == "3"
    assert last_number("none") is None


@pytest.mark.parametrize("name", ["boxed", "last_number", "math"])
def test_label_without_answer_raises(name):
    with pytest.raises(MilesError, match="label"):
        REWARDS[name](_s("5", None))
