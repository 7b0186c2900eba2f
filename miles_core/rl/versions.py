"""Weight versions and staleness: what `Sample.weight_versions` means and how it is measured.

A weight version counts optimizer steps: the engine starts at version 0 and, after rollout step
s, serves version (s + 1) * `train.num_steps_per_rollout` (a step that trains nothing still
advances the label, so versions stay a function of the step). Rollout step s is trained by
weights of version s * steps_per_rollout (its `train_version`); a trained token sampled by
version v is `train_version - v` versions stale. Staleness is measured on the tokens that train
(loss mask 1); tokens masked out of the loss cannot push the policy off course.

An engine never updated by this run reports its own label for its starting weights (SGLang's
is `default`): any label that is not a decimal number counts as version 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from miles_core.sample import Sample


def version_number(label: str) -> int:
    """The optimizer-step count of a weight-version label (non-numeric: the starting weights, 0)."""
    return int(label) if str(label).isdecimal() else 0


def version_after(step: int, steps_per_rollout: int) -> str:
    """The label of the weights after rollout step `step` (its optimizer steps included)."""
    return str((step + 1) * steps_per_rollout)


def train_version(step: int, steps_per_rollout: int) -> int:
    """The version of the weights that start training rollout step `step`."""
    return step * steps_per_rollout


def token_staleness(sample: Sample, trained_by: int) -> list[int]:
    """Staleness of each response token that trains (loss mask 1), in versions."""
    mask = sample.loss_mask or [1] * sample.response_length
    return [trained_by - version_number(v) for v, m in zip(sample.weight_versions, mask) if m]


def staleness_metrics(samples: Sequence[Sample], trained_by: int) -> dict[str, float]:
    """`rollout/staleness_mean` and `_max` over the trained tokens of a step's samples."""
    lags = [lag for sample in samples for lag in token_staleness(sample, trained_by)]
    return {"rollout/staleness_mean": sum(lags) / max(len(lags), 1),
            "rollout/staleness_max": float(max(lags, default=0))}


def too_stale(sample: Sample, trained_by: int, max_staleness: int) -> bool:
    """Whether a token of `sample` that trains would lag more than `max_staleness` versions."""
    return any(lag > max_staleness for lag in token_staleness(sample, trained_by))


def mask_prefix(sample: Sample) -> None:
    """Exclude every response token generated so far from the loss (an off-policy prefix)."""
    sample.loss_mask = [0] * sample.response_length
