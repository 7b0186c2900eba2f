"""GRPO-family math as pure functions: advantages, policy losses, KL estimators, reductions.

Tensors in, tensors out; no model, optimizer or distributed state. Each family is a registry
(`ADVANTAGE_ESTIMATORS`, `POLICY_LOSSES`, `KL_ESTIMATORS`, `AGGREGATIONS`) so new methods are
new entries, not new branches in callers.
"""

from miles_core.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    compute_advantages,
    group_advantages,
)
from miles_core.algo.kl import KL_ESTIMATORS, kl_estimate
from miles_core.algo.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    aggregate,
    policy_loss,
    ppo_clip_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "aggregate",
    "broadcast_to_tokens",
    "compute_advantages",
    "group_advantages",
    "kl_estimate",
    "policy_loss",
    "ppo_clip_loss",
]
