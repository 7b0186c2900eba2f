"""Reward functions by name: the built-in registry and user plugins named by a dotted path.

A reward function takes one `Sample` and returns a float, or a dict of named rewards (see
`compute.scalar_reward` for which entry counts); it may be `async def`. `RewardConfig.type`
names it: a key of `REWARDS`, or `package.module:function` / `package.module.function`,
imported with importlib from `sys.path`. Every way a path can be wrong is reported as one
`MilesError` line naming the path and the problem.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from miles_core.errors import MilesError, did_you_mean, one_of
from miles_core.rewards.exact import boxed_reward, last_number_reward
from miles_core.rewards.f1 import f1_reward
from miles_core.rewards.math_answer import math_reward
from miles_core.sample import Sample

RewardFn = Callable[[Sample], Any]
"""`(sample) -> float | dict`, or a coroutine function returning one of those."""

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "boxed": boxed_reward,
    "f1": f1_reward,
    "last_number": last_number_reward,
}


def resolve_reward(type_str: str) -> RewardFn:
    """A registry name or a dotted path -> the reward function, checked to take one argument."""
    if type_str in REWARDS:
        return REWARDS[type_str]
    if ":" not in type_str and "." not in type_str:
        raise MilesError(f"{one_of('reward', type_str, REWARDS)}, or a 'package.module:function' path")
    fn = _import_path(type_str)
    _check_signature(type_str, fn)
    return fn


def _import_path(path: str) -> Any:
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise MilesError(f"reward path '{path}' must look like 'package.module:function' or 'package.module.function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure while importing user code is a bad input
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        raise MilesError(f"reward '{path}': cannot import module '{module_name}' ({detail})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [name for name in dir(obj) if not name.startswith("_")]
            raise MilesError(f"reward '{path}': '{module_name}' has no attribute '{attr}'{did_you_mean(part, names)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise MilesError(f"reward '{path}' is not callable (it is {type(obj).__name__} {obj!r:.40})")
    return obj


def _check_signature(path: str, fn: Any) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # some builtins have no introspectable signature; the call itself will tell
    try:
        signature.bind(None)
    except TypeError:
        raise MilesError(
            f"reward '{path}' must take one argument (the Sample), but its signature is {signature}"
        ) from None
