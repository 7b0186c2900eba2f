"""slime's `deepscaler` (0/1) and `dapo` (+1/-1) graders on hand-graded responses."""

from __future__ import annotations

import pytest

from miles_core.errors import MilesError
from miles_core.rewards import dapo_reward, deepscaler_reward
from miles_core.rewards.slime_graders import boxed_answer, normalize_final_answer
from miles_core.sample import Sample


def _s(response: str, label) -> Sample:
    return Sample(index=0, response=response, label=label)


@pytest.mark.parametrize("response, label, expected", [
    ("<think>2+2 is 4</think>So the answer is \\boxed{4}.", "4", 1.0),   # correct after the thought
    ("<think>2+2 is 4</think>So the answer is \\boxed{5}.", "4", 0.0),   # wrong
    ("<think>it is \\boxed{4}</think>I am done.", "4", 0.0),              # box only inside the thought
    ("The answer is \\boxed{4}.", "4", 0.0),                              # no </think>: unfinished, 0
    ("<think>thinking without end \\boxed{4}", "4", 0.0),
    ("###Response\nIt is \\boxed{4}", "4", 1.0),                          # slime's other separator
    ("<think>a</think>\\boxed{3}</think>\\boxed{4}", "4", 1.0),           # text after the LAST </think>
    ("<think>a</think>\\boxed{\\frac{1}{2}}", "0.5", 1.0),                # equal values
    ("<think>a</think>\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("<think>a</think>\\boxed{4}", "\\boxed{4}", 1.0),                    # boxed label unwrapped
    ("<think>a</think>\\boxed{4}", 4, 1.0),                               # numeric label
    ("<think>a</think>\\boxed{4}", "", 0.0),                              # empty label
    ("<think>a</think>\\boxed{4} then \\boxed 5", "4", 0.0),              # last \boxed opens no brace
    ("<think>a</think>\\boxed{4", "4", 0.0),                              # box never closed
])
def test_deepscaler(response, label, expected):
    assert deepscaler_reward(_s(response, label)) == expected


def test_boxed_answer():
    assert boxed_answer("x \\boxed{1} y \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert boxed_answer("\\boxed {1}") is None and boxed_answer("none") is None


@pytest.mark.parametrize("response, label, expected", [
    ("Let me compute. 6*7 = 42.\nAnswer: 42", "42", 1.0),                 # correct
    ("Answer: 41", "42", -1.0),                                            # wrong
    ("I think it is 42.", "42", -1.0),                                     # no Answer: line -> [INVALID]
    ("<think>Answer: 5</think>\nAnswer: 6", "6", 1.0),                     # the last Answer: counts
    ("<think>Answer: 5</think>\nAnswer: 6", "5", -1.0),
    ("answer : $1,000$", "1000", 1.0),                                     # case, $..$, thousands comma
    ("Answer: x = 7 dollars", "7", 1.0),                                   # after '=', unit dropped
    ("Answer: \\boxed{12}", "12.0", 1.0),                                  # box unwrapped; label int(float)
    ("Answer: 7\n" + "x" * 300, "7", -1.0),                                # only the last 300 chars count
])
def test_dapo(response, label, expected):
    assert dapo_reward(_s(response, label)) == expected


def test_dapo_normalisation():
    # '=' split -> ' \text{5 cm}'; spaces go -> '\text{5cm}'; 'cm' dropped -> '\text{5}'; unwrapped -> '5'
    assert normalize_final_answer("x = \\text{5 cm}") == "5"
    assert normalize_final_answer("\\frac12") == "\\frac{1}{2}"
    assert normalize_final_answer("3^\\circ") == "3"


def test_dapo_needs_an_integer_label():
    with pytest.raises(MilesError, match="dapo reward needs an integer label, got 'abc'"):
        dapo_reward(_s("Answer: abc", "abc"))
