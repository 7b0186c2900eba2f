"""Metrics that measure rounding noise, and how runs that should agree are compared on them.

In fast mode the engine-vs-trainer log-prob gaps (`train/train_rollout_*`) are the difference of two
computations of the same numbers by different CPU kernels: another CPU (AMD's code paths against
Intel's) or another process layout (an engine behind HTTP, batched differently) rounds them
differently. Two runs that do the same math agree on them only within these absolute bounds; a
changed log-prob formula moves them by orders of magnitude more.
"""

from __future__ import annotations

KERNEL_NOISE = {
    "train/train_rollout_logprob_abs_diff": 1e-5,
    "train/train_rollout_logprob_max_abs_diff": 1e-5,
    "train/train_rollout_kl": 1e-10,
    "train/train_rollout_logprob_bitwise_equal": 0.25,
}


def noise_differences(got: list[dict], expected: list[dict]) -> list[dict]:
    """Per step, the kernel-noise metrics that differ beyond their bounds: {key: (got, expected)}."""
    return [{k: (g[k], e[k]) for k in KERNEL_NOISE.keys() & e.keys() if abs(g[k] - e[k]) > KERNEL_NOISE[k]}
            for g, e in zip(got, expected)]


def without_noise(rows: list[dict]) -> list[dict]:
    """The rows without timings (`perf/`) and without the kernel-noise metrics."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k not in KERNEL_NOISE} for r in rows]
