"""Per-token KL(policy || reference) estimators from sampled-token log-probabilities.

With log_ratio = logp - ref_logp at tokens sampled from the policy (Schulman 2020,
"Approximating KL Divergence"):
  k1 = log_ratio                                   unbiased, high variance, can be negative
  k2 = 0.5 * log_ratio^2                           biased, low variance
  k3 = exp(-log_ratio) - (-log_ratio) - 1          unbiased, low variance, always >= 0
  low_var_kl = k3 clamped to [-10, 10]             verl's name for the clamped k3
For `low_var_kl` the log ratio is also clamped to [-20, 20] before the exp, as verl does: the
output clamp alone would turn an overflowing exp into a NaN gradient (0 * inf). Plain `k3` is
left unclamped, as written above.

Unbiased KL (DeepSeek-V3.2, `algo.use_unbiased_kl`): samples come from the old policy, not the
current one, so the estimate is weighted by the importance ratio pi_theta / pi_old =
exp(logp - old_logp), gradient included, as slime does; for `low_var_kl` the [-10, 10] clamp
applies to the weighted value, as in slime.

Reference refresh (`algo.ref_update_interval`): `should_update_reference` says after which
rollout steps the reference model takes the policy's weights.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from miles_core.errors import one_of

KLEstimator = Callable[[Tensor], Tensor]

LOW_VAR_KL_BOUND = 10.0
LOW_VAR_LOG_RATIO_BOUND = 20.0


def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: Tensor) -> Tensor:
    ref_minus_logp = -log_ratio
    return torch.exp(ref_minus_logp) - ref_minus_logp - 1


def _low_var_kl(log_ratio: Tensor) -> Tensor:
    log_ratio = log_ratio.clamp(-LOW_VAR_LOG_RATIO_BOUND, LOW_VAR_LOG_RATIO_BOUND)
    return _k3(log_ratio).clamp(-LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND)


# Each entry maps log_ratio = logp - ref_logp (per token) to the per-token estimate.
KL_ESTIMATORS: dict[str, KLEstimator] = {
    "k1": _k1,
    "k2": _k2,
    "k3": _k3,
    "low_var_kl": _low_var_kl,
}


def kl_estimate(log_probs: Tensor, ref_log_probs: Tensor, kind: str, *,
                importance_ratio: Tensor | None = None) -> Tensor:
    """Per-token KL estimate of the given `kind` (k1, k2, k3, low_var_kl); same shape as inputs.

    With `importance_ratio` (pi_theta / pi_old per token) the estimate is the unbiased one.
    """
    if kind not in KL_ESTIMATORS:
        # Names are checked against AlgoConfig when the recipe loads; reaching here is a bug in
        # the caller, hence ValueError (with the same one-line wording as user errors).
        raise ValueError(str(one_of("KL estimator", kind, KL_ESTIMATORS)))
    log_ratio = log_probs - ref_log_probs
    if importance_ratio is None:
        return KL_ESTIMATORS[kind](log_ratio)
    if kind == "low_var_kl":
        weighted = importance_ratio * _k3(log_ratio.clamp(-LOW_VAR_LOG_RATIO_BOUND, LOW_VAR_LOG_RATIO_BOUND))
        return weighted.clamp(-LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND)
    return importance_ratio * KL_ESTIMATORS[kind](log_ratio)


def should_update_reference(step: int, interval: int) -> bool:
    """True after rollout `step` (0-based) when the reference should copy the policy; 0 = never."""
    return interval > 0 and (step + 1) % interval == 0
