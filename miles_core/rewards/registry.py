"""Reward functions by name: the built-in registry and user plugins named by a dotted path.

A reward function takes one `Sample` and returns a float, or a dict of named rewards (see
`compute.scalar_reward` for which entry counts); it may be `async def`. `RewardConfig.type`
names it: a key of `REWARDS`, or `package.module:function` / `package.module.function`,
imported with importlib from `sys.path`. A reward that needs its config (`remote_rm`, which reads
`reward.remote_url`) is built from it by a factory in `CONFIGURED_REWARDS`. Every way a path can be wrong is reported as one
`MilesError` line naming the path and the problem.
"""

from __future__ import annotations

from typing import Any, Callable

from miles_core.algo.hooks import resolve_hook
from miles_core.config import RewardConfig
from miles_core.rewards.exact import boxed_reward, last_number_reward
from miles_core.rewards.f1 import f1_reward
from miles_core.rewards.math_answer import math_reward
from miles_core.rewards.remote import RemoteReward
from miles_core.rewards.slime_graders import dapo_reward, deepscaler_reward
from miles_core.sample import Sample

RewardFn = Callable[[Sample], Any]
"""`(sample) -> float | dict`, or a coroutine function returning one of those."""

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "boxed": boxed_reward,
    "f1": f1_reward,
    "last_number": last_number_reward,
    "deepscaler": deepscaler_reward,
    "dapo": dapo_reward,
}

CONFIGURED_REWARDS: dict[str, Callable[[RewardConfig], RewardFn]] = {
    "remote_rm": RemoteReward.from_config,
}


def resolve_reward(type_str: str) -> RewardFn:
    """A registry name or a dotted path -> the reward function, checked to take one argument
    (the dotted-path resolver is the one every user hook goes through)."""
    return resolve_hook(type_str, "reward", registry=REWARDS)


def reward_function(cfg: RewardConfig) -> RewardFn:
    """The reward function `cfg.type` names, built from `cfg` where it needs it (`remote_rm`)."""
    if cfg.type in CONFIGURED_REWARDS:
        return CONFIGURED_REWARDS[cfg.type](cfg)
    return resolve_reward(cfg.type)
