"""Runs recorded before the package was restructured (commit 144f617, `miles train --recipe R
--num-rollout 3`, timings dropped) must come out the same after it: a restructuring changes no
number. The plain tiny recipes are the issue's recordings; with their random models every reward
is 0, so the `-ent` runs add `algo.entropy_coef = 0.01` (non-zero gradients: the weights move)
and `tiny-dapo` exercises dynamic sampling with non-zero rewards.

On the machine that recorded them the metrics were bitwise equal; the comparison allows a
relative 1e-6 so another CPU's kernels cannot fail it while any change of the math does, and the
fast-mode engine-vs-trainer gaps (`KERNEL_NOISE`: pure rounding noise, which an AMD CPU rounds
differently from the Intel one that recorded them) only absolute bounds.

Re-recorded on 2026-11-27 (paged engine, issue 12), only the `train/train_rollout_*` values of
`tiny-moe-ent`, `tiny-deepseek-ent` and `tiny-deepseek`: in fast mode finished rows now leave
the decode batch at once, so MoE expert matmuls sum over different row sets, and the engine
hands CPU SDPA a strided key view instead of a contiguous copy (different low bits); tokens,
rewards and losses are unchanged.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from miles_core.config import load_config
from miles_core.rl.loop import run_training
from tests.kernel_noise import KERNEL_NOISE

EXACT = bool(os.environ.get("MILES_GOLDEN_EXACT"))  # bitwise, on the recording machine
GOLDEN = Path(__file__).parent / "golden"
RUNS = {
    "tiny": ("tiny", []),
    "tiny-moe": ("tiny-moe", []),
    "tiny-deepseek": ("tiny-deepseek", []),
    "tiny-ent": ("tiny", ["algo.entropy_coef=0.01"]),
    "tiny-moe-ent": ("tiny-moe", ["algo.entropy_coef=0.01"]),
    "tiny-deepseek-ent": ("tiny-deepseek", ["algo.entropy_coef=0.01"]),
    "tiny-dapo": ("tiny-dapo", []),
}


def _close(key, a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and not EXACT:
        if key in KERNEL_NOISE:  # rounding noise: absolute bounds
            return abs(a - b) <= KERNEL_NOISE[key]
        return a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


@pytest.mark.parametrize("name", sorted(RUNS))
def test_metrics_equal_the_recording(name, tmp_path):
    recipe, overrides = RUNS[name]
    run_training(load_config(recipe, ["loop.num_rollout=3", *overrides]), tmp_path / "run")
    expected = [json.loads(line) for line in (GOLDEN / f"{name}.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # train/skipped_step (the NaN guard, issue 21) is newer than the recording: always 0 here.
    assert all(record.pop("train/skipped_step", 0.0) == 0.0 for record in got)
    got = [{k: v for k, v in record.items() if not k.startswith("perf/")} for record in got]
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]
    for step, (g, e) in enumerate(zip(got, expected)):
        differ = {k: (g[k], e[k]) for k in e if not _close(k, g[k], e[k])}
        assert not differ, f"step {step}: {differ}"
