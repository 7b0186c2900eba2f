"""RL algorithm math as pure functions: advantages (GRPO family, RLOO, REINFORCE++, PPO/GAE),
policy losses (PPO clip, GSPO, CISPO, OPSM, value loss), KL estimators, train/inference mismatch
corrections (TIS/MIS/RS/IcePop), sampling-side filters and user hooks.

Tensors in, tensors out; no model, optimizer or distributed state. Each family is a registry
(`ADVANTAGE_ESTIMATORS`, `POLICY_LOSSES`, `KL_ESTIMATORS`, `AGGREGATIONS`) so new methods are
new entries, not new branches in callers. The trainer and the loop call the config-driven entry
points: `post_process_rewards`, `keep_groups`, `estimate_advantages`, `tis_batch_mean`,
`policy_loss`, `should_update_reference`, and `resolve_hooks` once at start-up.
"""

from miles_core.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    compute_advantages,
    estimate_advantages,
    group_advantages,
    normalize_advantages,
)
from miles_core.algo.correction import correction_weights, is_weights, tis_batch_mean
from miles_core.algo.filters import (
    DynamicSamplingTally,
    dynamic_sampling_keep,
    keep_groups,
    overlong_penalty,
    post_process_rewards,
    round_size,
)
from miles_core.algo.gae import discounted_returns, gae
from miles_core.algo.hooks import HOOKS, AlgoHooks, resolve_hook, resolve_hooks
from miles_core.algo.kl import KL_ESTIMATORS, kl_estimate, should_update_reference
from miles_core.algo.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    accumulate_metrics,
    aggregate,
    cispo_loss,
    gspo_loss,
    policy_loss,
    ppo_clip_loss,
    value_loss,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "HOOKS",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "AlgoHooks",
    "DynamicSamplingTally",
    "accumulate_metrics",
    "aggregate",
    "broadcast_to_tokens",
    "cispo_loss",
    "compute_advantages",
    "correction_weights",
    "discounted_returns",
    "dynamic_sampling_keep",
    "estimate_advantages",
    "gae",
    "group_advantages",
    "gspo_loss",
    "is_weights",
    "keep_groups",
    "kl_estimate",
    "normalize_advantages",
    "overlong_penalty",
    "policy_loss",
    "post_process_rewards",
    "ppo_clip_loss",
    "resolve_hook",
    "resolve_hooks",
    "round_size",
    "should_update_reference",
    "tis_batch_mean",
    "value_loss",
]
