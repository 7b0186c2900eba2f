"""Scoring a batch of samples: call the configured reward function once per sample.

Built-in synchronous functions run one after another in the calling thread: they are cheap, and
it keeps math-verify in the main thread where its own timeouts work. A user (dotted-path)
synchronous function runs one sample at a time in a daemon worker thread bounded by
`RewardConfig.timeout`; a Python thread cannot be killed, so a call that times out is left
running in the background (never waited for) and its sample scores 0. `async def` functions
(remote judges, sandboxes) run concurrently, at most `RewardConfig.max_concurrency` in flight,
each bounded by the same timeout.

A reward function that raises, times out, or returns something that is not a finite number (or
a dict holding one under the configured key) gets reward 0.0 and `metadata["reward_error"]`;
the failure is counted in `RewardStats`, the first one is logged as one line with its sample
index, and more than `RewardConfig.max_failure_fraction` of a batch failing stops the run.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
import threading
from dataclasses import dataclass
from typing import Any

from miles_core.config import RewardConfig
from miles_core.errors import MilesError
from miles_core.rewards.registry import REWARDS, RewardFn, reward_function
from miles_core.sample import Sample

log = logging.getLogger("miles")

Outcome = tuple[Any, str | None]
"""(what the function returned, None) or (None, one-line description of what it raised)."""


@dataclass(frozen=True, kw_only=True)
class RewardStats:
    num_samples: int
    num_failed: int
    """Samples whose reward function raised or returned an unusable value (scored 0.0)."""
    first_error: str | None
    """`sample <index>: <error>` for the first failure, None if there was none."""
    mean_reward: float
    """Mean scalar reward over all samples, failures counted as 0.0; 0.0 for no samples."""


def compute_rewards(samples: list[Sample], cfg: RewardConfig) -> RewardStats:
    """Set `sample.reward` on every sample. From synchronous code only (see the async twin)."""
    fn = reward_function(cfg)
    if _is_async(fn):
        outcomes = asyncio.run(_call_all_async(fn, samples, cfg.max_concurrency, cfg.timeout))
    else:
        outcomes = _call_all(fn, samples, cfg)
    return check_failures(_apply(samples, outcomes, cfg.key), cfg)


async def compute_rewards_async(samples: list[Sample], cfg: RewardConfig) -> RewardStats:
    """`compute_rewards` for callers already inside a running event loop."""
    fn = reward_function(cfg)
    if _is_async(fn):
        outcomes = await _call_all_async(fn, samples, cfg.max_concurrency, cfg.timeout)
    else:
        outcomes = _call_all(fn, samples, cfg)
    return check_failures(_apply(samples, outcomes, cfg.key), cfg)


def check_failures(stats: RewardStats, cfg: RewardConfig) -> RewardStats:
    """Log the batch's first failure; stop when more than `cfg.max_failure_fraction` failed."""
    if not stats.num_failed:
        return stats
    summary = f"{stats.num_failed} of {stats.num_samples} reward calls failed ({cfg.type}); first: {stats.first_error}"
    if stats.num_failed > cfg.max_failure_fraction * stats.num_samples:
        raise MilesError(f"{summary}; more than reward.max_failure_fraction = {cfg.max_failure_fraction:g}")
    log.warning("%s", summary)
    return stats


def scalar_reward(sample: Sample, cfg: RewardConfig) -> float:
    """The sample's reward as one float: the number, or the dict entry `cfg.key` (else `reward`)."""
    if sample.reward is None:
        raise ValueError(f"sample {sample.index} has no reward yet; run compute_rewards first")
    return _scalar(sample.reward, cfg.key)


def _scalar(value: Any, key: str) -> float:
    if isinstance(value, dict):
        value = value[_dict_key(value, key)]
    if not isinstance(value, numbers.Real):
        raise MilesError(f"reward must be a number or a dict of numbers, got {type(value).__name__} {value!r:.60}")
    if not math.isfinite(value):
        raise MilesError(f"reward must be finite, got {value}")
    return float(value)


def _dict_key(value: dict[str, Any], key: str) -> str:
    if key and key not in value:
        raise MilesError(f"reward dict has no key '{key}' (reward.key); its keys are {sorted(value)}")
    if not key and "reward" not in value:
        raise MilesError(f"reward dict has no 'reward' entry; set reward.key to one of {sorted(value)}")
    return key or "reward"


def _is_async(fn: RewardFn) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _call(fn: RewardFn, sample: Sample) -> Outcome:
    try:
        return fn(sample), None
    except Exception as err:  # a failing reward must not stop training
        return None, _describe(err)


def _call_all(fn: RewardFn, samples: list[Sample], cfg: RewardConfig) -> list[Outcome]:
    if cfg.timeout <= 0 or cfg.type in REWARDS:
        return [_call(fn, sample) for sample in samples]
    return [_call_in_thread(fn, sample, cfg.timeout) for sample in samples]


def _call_in_thread(fn: RewardFn, sample: Sample, timeout: float) -> Outcome:
    """`_call` in a daemon thread; after `timeout` seconds the thread is abandoned, not joined."""
    box: list[Outcome] = []
    worker = threading.Thread(target=lambda: box.append(_call(fn, sample)), daemon=True, name="miles-reward")
    worker.start()
    worker.join(timeout)
    return box[0] if box else (None, _timed_out(timeout))


def _timed_out(timeout: float) -> str:
    return f"timed out after {timeout:g} s (reward.timeout)"


async def _call_all_async(fn: RewardFn, samples: list[Sample], max_concurrency: int,
                          timeout: float = 0.0) -> list[Outcome]:
    semaphore = asyncio.Semaphore(max_concurrency)

    async def call_one(sample: Sample) -> Outcome:
        async with semaphore:
            try:
                return await asyncio.wait_for(fn(sample), timeout if timeout > 0 else None), None
            except asyncio.TimeoutError:
                return None, _timed_out(timeout)
            except Exception as err:  # as in `_call`
                return None, _describe(err)

    return await asyncio.gather(*(call_one(sample) for sample in samples))


def _describe(err: Exception) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def _apply(samples: list[Sample], outcomes: list[Outcome], key: str) -> RewardStats:
    """Store each outcome on its sample (0.0 for failures) and summarise."""
    total, num_failed, first_error = 0.0, 0, None
    for sample, (value, error) in zip(samples, outcomes):
        if error is None:
            try:
                scalar = _scalar(value, key)
            except MilesError as err:
                error = str(err)
        if error is not None:
            num_failed += 1
            first_error = first_error or f"sample {sample.index}: {error}"
            sample.reward, scalar = 0.0, 0.0
            sample.metadata["reward_error"] = error
        else:
            sample.reward = value if isinstance(value, dict) else scalar
            sample.metadata.pop("reward_error", None)  # stale from an earlier scoring
        total += scalar
    mean = total / len(samples) if samples else 0.0
    return RewardStats(num_samples=len(samples), num_failed=num_failed, first_error=first_error, mean_reward=mean)
