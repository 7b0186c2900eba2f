"""Advantage estimators: per-sample rewards in, advantages out.

Shape legend: N samples of one rollout step (prompt-major: the `group_size` responses to one
prompt are consecutive), G = N / group_size groups, T response tokens.

GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean(group)) / (std(group) + eps), with
the unbiased std (`torch.std`'s default, as slime and verl compute it). Dr. GRPO (Liu et al.
2025) drops the std division: A_i = r_i - mean(group).

Estimators are looked up by name in `ADVANTAGE_ESTIMATORS`. Every entry has the signature
`(rewards, group_size, **inputs) -> Tensor` and returns either (N,) per-sample advantages or
(N, T) per-token ones; callers pass every per-token tensor they hold as keyword `inputs` and
always finish with `broadcast_to_tokens`, so estimators that need more (values for GAE, token
KL for REINFORCE++) slot in as new entries without touching the caller. An entry ignores the
inputs it has no use for.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from miles_core.errors import one_of

AdvantageEstimator = Callable[..., Tensor]


def group_advantages(rewards: Tensor, group_size: int, *, normalize_std: bool, eps: float = 1e-6) -> Tensor:
    """(N,) rewards -> (N,) advantages centred (and optionally std-scaled) within each group."""
    _check_groups(rewards, group_size)
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    if group_size == 1:
        # A lone sample has no baseline to compare with; std would be NaN (0 degrees of freedom).
        return torch.zeros_like(rewards)
    grouped = rewards.view(-1, group_size)  # (G, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def _check_groups(rewards: Tensor, group_size: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"number of rewards ({rewards.numel()}) is not a multiple of group_size ({group_size})")


def _grpo(rewards: Tensor, group_size: int, **inputs: Tensor) -> Tensor:
    return group_advantages(rewards, group_size, normalize_std=True)


def _dr_grpo(rewards: Tensor, group_size: int, **inputs: Tensor) -> Tensor:
    return group_advantages(rewards, group_size, normalize_std=False)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
}


def compute_advantages(name: str, rewards: Tensor, group_size: int, **inputs: Tensor) -> Tensor:
    """Run the estimator registered as `name`; (N,) or (N, T) advantages (see module docstring)."""
    if name not in ADVANTAGE_ESTIMATORS:
        # Names are checked against AlgoConfig when the recipe loads; reaching here is a bug in
        # the caller, hence ValueError (with the same one-line wording as user errors).
        raise ValueError(str(one_of("advantage estimator", name, ADVANTAGE_ESTIMATORS)))
    return ADVANTAGE_ESTIMATORS[name](rewards, group_size, **inputs)


def broadcast_to_tokens(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """(N,) per-sample or (N, T) per-token advantages -> (N, T), zero where `loss_mask` is 0."""
    if advantages.dim() == 1 and advantages.shape[0] == loss_mask.shape[0]:
        advantages = advantages.unsqueeze(1)  # (N, 1), broadcast over T below
    elif advantages.shape != loss_mask.shape:
        raise ValueError(
            f"advantages of shape {tuple(advantages.shape)} do not fit loss_mask of shape "
            f"{tuple(loss_mask.shape)}; expected (N,) or (N, T)"
        )
    return advantages * loss_mask
