"""Rewards: the registry of reward functions and the batch scorer that applies one.

Built-ins: `math` (math-verify equivalence), `boxed` (last `\\boxed{}` exact match), `f1`
(SQuAD token F1), `last_number` (last number equals the label), slime's `deepscaler` and `dapo` graders, and
`remote_rm` (an HTTP reward service at `reward.remote_url`). Anything else is a user
function named by a dotted path; see `registry.py` for the contract.
"""

from miles_core.rewards.compute import RewardStats, compute_rewards, compute_rewards_async, scalar_reward
from miles_core.rewards.exact import boxed_reward, last_boxed, last_number, last_number_reward
from miles_core.rewards.f1 import f1_reward, normalize_answer, token_f1
from miles_core.rewards.math_answer import math_reward
from miles_core.rewards.registry import CONFIGURED_REWARDS, REWARDS, RewardFn, resolve_reward, reward_function
from miles_core.rewards.remote import RemoteReward
from miles_core.rewards.slime_graders import dapo_reward, deepscaler_reward

__all__ = [
    "CONFIGURED_REWARDS",
    "RemoteReward",
    "dapo_reward",
    "deepscaler_reward",
    "reward_function",
    "REWARDS",
    "RewardFn",
    "RewardStats",
    "boxed_reward",
    "compute_rewards",
    "compute_rewards_async",
    "f1_reward",
    "last_boxed",
    "last_number",
    "last_number_reward",
    "math_reward",
    "normalize_answer",
    "resolve_reward",
    "scalar_reward",
    "token_f1",
]
