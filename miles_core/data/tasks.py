"""Built-in prompt generators: deterministic tasks that need no dataset file.

A task is a function from its own config section (`DataConfig.<task name>`) to a list of records
shaped like a prompt file's lines: {"prompt", "label", "metadata"}. `TASKS` maps the name a
recipe uses (`data.task`) to that function; a new task is one function, one entry here and one
config field of the same name.

Arithmetic splits its problems into `train` and `test` by a stable hash of the problem text, so
the held-out set never overlaps training, whatever the seeds and sizes. Problems are drawn
uniformly from the split's pool; small pools are enumerated, large ones (wide operand ranges)
are rejection-sampled so memory does not grow with the range.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from miles_core.config import ArithmeticConfig
from miles_core.errors import MilesError

Problem = tuple[int, str, int]
"""(a, op, b): one arithmetic problem."""

# Pools up to this size are listed in full; beyond it, listing would cost memory that grows
# with the operand range squared, while rejection sampling costs only `num_prompts`.
_ENUMERATE_LIMIT = 100_000
_TEST_BUCKETS = 5
"""One problem in `_TEST_BUCKETS` (by hash) is held out for `test`."""


def problem_split(problem: Problem) -> str:
    """`test` or `train`. crc32 rather than `hash()`: the latter changes every process."""
    a, op, b = problem
    bucket = zlib.crc32(f"{a} {op} {b}".encode()) % _TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def arithmetic_records(cfg: ArithmeticConfig) -> list[dict[str, Any]]:
    """`cfg.num_prompts` problems from `cfg.split`, the same list for the same config."""
    rng = random.Random(cfg.seed)
    return [_record(problem) for problem in _draw(rng, cfg)]


def _operators(cfg: ArithmeticConfig) -> list[str]:
    # Repeated characters ("++-") would otherwise weight an operator twice.
    return list(dict.fromkeys(cfg.operators))


def _draw(rng: random.Random, cfg: ArithmeticConfig) -> list[Problem]:
    width = cfg.max_operand - cfg.min_operand + 1
    total = len(_operators(cfg)) * width * width
    # Enumerating costs O(total); that is fine while it is small or near the output size.
    if total <= max(_ENUMERATE_LIMIT, 10 * cfg.num_prompts):
        return _draw_enumerated(rng, cfg)
    return _draw_rejection(rng, cfg, total)


def _problem_at(cfg: ArithmeticConfig, index: int) -> Problem:
    """Problem number `index` of the full pool (every operator, every operand pair)."""
    width = cfg.max_operand - cfg.min_operand + 1
    op_index, rest = divmod(index, width * width)
    a, b = divmod(rest, width)
    return cfg.min_operand + a, _operators(cfg)[op_index], cfg.min_operand + b


def _all_problems(cfg: ArithmeticConfig) -> Iterator[Problem]:
    """Every problem, in the same order as `_problem_at` numbers them."""
    operands = range(cfg.min_operand, cfg.max_operand + 1)
    for op in _operators(cfg):
        for a in operands:
            for b in operands:
                yield a, op, b


def _draw_enumerated(rng: random.Random, cfg: ArithmeticConfig) -> list[Problem]:
    pool = [p for p in _all_problems(cfg) if problem_split(p) == cfg.split]
    if not pool:
        raise MilesError(
            f"arithmetic split '{cfg.split}' has no problems with operands in "
            f"[{cfg.min_operand}, {cfg.max_operand}] and operators '{cfg.operators}'; widen the range"
        )
    if cfg.num_prompts > len(pool):
        return rng.choices(pool, k=cfg.num_prompts)
    return rng.sample(pool, cfg.num_prompts)


def _draw_rejection(rng: random.Random, cfg: ArithmeticConfig, total: int) -> list[Problem]:
    # Only reached when the pool is over 10x `num_prompts`; about 1 in 5 (test) or 4 in 5
    # (train) draws land in the split, so the loop ends after a few times `num_prompts` draws.
    seen: set[Problem] = set()
    drawn: list[Problem] = []
    while len(drawn) < cfg.num_prompts:
        problem = _problem_at(cfg, rng.randrange(total))
        if problem not in seen and problem_split(problem) == cfg.split:
            seen.add(problem)
            drawn.append(problem)
    return drawn


def _answer(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def _record(problem: Problem) -> dict[str, Any]:
    a, op, b = problem
    # "3 - (-2)" rather than "3 - -2", which reads like a typo.
    right = f"({b})" if b < 0 else str(b)
    return {
        "prompt": f"What is {a} {op} {right}?",
        "label": str(_answer(a, op, b)),
        "metadata": {"task": "arithmetic", "a": a, "b": b, "op": op},
    }


TASKS: dict[str, Callable[[Any], list[dict[str, Any]]]] = {
    "arithmetic": arithmetic_records,
}
"""Task name (`data.task`) -> generator; it receives the `DataConfig` field of the same name."""
