"""slime's rule-based graders `deepscaler` and `dapo` (slime `rollout/rm_hub/`), for `--rm-type`.

`deepscaler` (0/1): the solution is the text after the LAST `</think>`; without one, the text
after the first `###Response`; with neither the reward is 0 (an unfinished thought earns
nothing). Its answer is the content of the last `\\boxed{...}` (the last `\\boxed` must open a
brace right away, else there is no answer: 0). A label holding `\\boxed{}` is unwrapped the same
way; an empty label scores 0. Deviation from slime: slime compares with deepscaler's MATH string
normalisation, then a sympy difference; miles compares the light normalisation of `exact.py`
and then math-verify (`math_answer.py`), which accepts the same equal forms (`0.5` vs
`\\frac{1}{2}`) and a few more.

`dapo` (+1/-1), as slime's copy of the DAPO grader (Minerva-style): only the last 300
characters of the response count; the answer is the text after the last `Answer:` (case
insensitive) up to the line end, `[INVALID]` when there is none. Answer and label are normalised
(`normalize_final_answer`: text after the last `=`, units and TeX decorations dropped, `$...$`
kept inside, thousands commas removed from integers), the label is then read as an integer (DAPO's
answers are integers; a non-numeric label raises, so the sample counts as a reward failure) and
the two strings must be equal. slime returns `{score, acc, pred}`; miles returns the score.
"""

from __future__ import annotations

import re
from typing import Any

from miles_core.errors import MilesError
from miles_core.rewards.exact import _balanced_content, _normalise
from miles_core.sample import Sample


def deepscaler_reward(sample: Sample) -> float:
    """1.0 if the boxed answer after `</think>` (or `###Response`) equals the label, else 0.0."""
    response, label = sample.response, _label(sample.label)
    if "</think>" in response:
        solution = response.split("</think>")[-1]
    elif "###Response" in response:
        solution = response.split("###Response")[1]
    else:
        return 0.0
    answer = boxed_answer(solution)
    truth = boxed_answer(label) if "\\boxed" in label else label
    if answer is None or not truth:
        return 0.0
    return 1.0 if _same_math(answer, truth) else 0.0


def boxed_answer(text: str) -> str | None:
    """Content of the last `\\boxed{...}` when that last `\\boxed` opens a brace at once."""
    start = text.rfind("\\boxed")
    if start < 0 or not text.startswith("{", start + len("\\boxed")):
        return None
    return _balanced_content(text, start + len("\\boxed{"))


def _same_math(answer: str, truth: str) -> bool:
    if _tex_normalise(answer) == _tex_normalise(truth):
        return True
    from miles_core.rewards.math_answer import math_reward  # math-verify: imports sympy lazily

    try:
        return math_reward(Sample(index=0, response=f"${answer}$", label=truth)) == 1.0
    except MilesError:  # a label math-verify cannot parse: only the string comparison counts
        return False


def _tex_normalise(text: str) -> str:
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("dfrac", "frac"), ("tfrac", "frac")):
        text = text.replace(old, new)
    return _normalise(text)


def _label(label: Any) -> str:
    if isinstance(label, (str, int, float)) and not isinstance(label, bool):
        return str(label)
    raise MilesError(f"expected a str or number label, got {label!r}")


# -- dapo ------------------------------------------------------------------------------------------

_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_REPLACE = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
            (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_DROP = ["square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
         "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
         "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
         "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;",
         r",\!", "{,}", '"', "\\dots", "<|im_end|>", "<|endoftext|>"]
_UNWRAP = [(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$"), (r"(\\text\{)(.*?)(\})", "\\2"), (r"(\\textbf\{)(.*?)(\})", "\\2"),
           (r"(\\overline\{)(.*?)(\})", "\\2"), (r"(\\boxed\{)(.*)(\})", "\\2"),
           (r"(frac)([^{])(.)", "frac{\\2}{\\3}"), (r"(sqrt)([^{])", "sqrt{\\2}")]


def dapo_reward(sample: Sample) -> float:
    """+1.0 if the last `Answer:` line of the response's tail equals the integer label, else -1.0."""
    found = _ANSWER.findall(sample.response[-300:])
    prediction = normalize_final_answer(found[-1] if found else "[INVALID]")
    truth = normalize_final_answer(_label(sample.label))
    try:
        truth = str(int(float(truth)))
    except ValueError:
        raise MilesError(f"dapo reward needs an integer label, got {sample.label!r}") from None
    return 1.0 if prediction == truth else -1.0


def normalize_final_answer(answer: str) -> str:
    """The DAPO/Minerva normalisation of a final answer (see the module docstring)."""
    answer = str(answer).split("=")[-1]
    for old, new in _REPLACE:
        answer = answer.replace(old, new)
    for expr in _DROP:
        answer = answer.replace(expr, "")
    for pattern, repl in _UNWRAP:
        answer = re.sub(pattern, repl, answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()
