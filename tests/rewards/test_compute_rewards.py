"""`compute_rewards`: failures are scored 0 and counted, dict rewards, async concurrency."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest

from miles_core.config import RewardConfig
from miles_core.errors import MilesError
from miles_core.rewards import compute_rewards, compute_rewards_async, scalar_reward
from miles_core.sample import Sample


@pytest.fixture
def plugin(monkeypatch):
    """Register functions as attributes of an in-memory module `reward_fns`."""
    module = types.ModuleType("reward_fns")
    monkeypatch.setitem(sys.modules, "reward_fns", module)
    return module


def _samples(*responses: str) -> list[Sample]:
    return [Sample(index=i, response=r, label="1") for i, r in enumerate(responses)]


def test_builtin_by_name():
    samples = [Sample(index=0, response="\\boxed{1}", label=1), Sample(index=1, response="\\boxed{2}", label=1)]
    stats = compute_rewards(samples, RewardConfig(type="boxed"))
    assert [s.reward for s in samples] == [1.0, 0.0]
    assert stats == type(stats)(num_samples=2, num_failed=0, first_error=None, mean_reward=0.5)


def test_raising_reward_scores_zero_and_is_counted(plugin):
    def flaky(sample):
        if sample.response == "bad":
            raise RuntimeError("judge unreachable")
        return 1.0
    plugin.flaky = flaky
    samples = _samples("ok", "bad", "ok", "bad")
    stats = compute_rewards(samples, RewardConfig(type="reward_fns:flaky"))
    assert [s.reward for s in samples] == [1.0, 0.0, 1.0, 0.0]
    assert stats.num_failed == 2 and stats.mean_reward == 0.5
    assert stats.first_error == "sample 1: RuntimeError: judge unreachable"
    assert samples[1].metadata["reward_error"] == "RuntimeError: judge unreachable"


def test_async_reward_failures_and_concurrency_limit(plugin):
    in_flight, peak = 0, 0

    async def slow(sample):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        if sample.response == "bad":
            raise ValueError("boom")
        return 1
    plugin.slow = slow
    samples = _samples(*["ok"] * 7, "bad")
    stats = compute_rewards(samples, RewardConfig(type="reward_fns:slow", max_concurrency=3))
    assert peak == 3
    assert [s.reward for s in samples] == [1.0] * 7 + [0.0]
    assert stats.num_failed == 1 and stats.first_error == "sample 7: ValueError: boom"


def test_compute_rewards_async_inside_a_running_loop(plugin):
    async def judge(sample):
        return 0.25
    plugin.judge = judge
    samples = _samples("a", "b")
    stats = asyncio.run(compute_rewards_async(samples, RewardConfig(type="reward_fns:judge")))
    assert stats.mean_reward == 0.25 and [s.reward for s in samples] == [0.25, 0.25]


def test_dict_rewards(plugin):
    plugin.scores = lambda sample: {"reward": 0.5, "acc": 1.0, "format": 0.0}
    samples = _samples("a")
    assert compute_rewards(samples, RewardConfig(type="reward_fns:scores")).mean_reward == 0.5  # `reward` entry
    assert samples[0].reward == {"reward": 0.5, "acc": 1.0, "format": 0.0}  # stored as returned
    assert compute_rewards(samples, RewardConfig(type="reward_fns:scores", key="acc")).mean_reward == 1.0
    assert scalar_reward(samples[0], RewardConfig(key="format")) == 0.0


def test_dict_without_usable_key_is_a_failure(plugin):
    plugin.scores = lambda sample: {"acc": 1.0, "format": 0.0}
    samples = _samples("a")
    stats = compute_rewards(samples, RewardConfig(type="reward_fns:scores", max_failure_fraction=1.0))
    assert stats.num_failed == 1 and samples[0].reward == 0.0
    assert stats.first_error == "sample 0: reward dict has no 'reward' entry; set reward.key to one of ['acc', 'format']"
    stats = compute_rewards(samples, RewardConfig(type="reward_fns:scores", key="accuracy", max_failure_fraction=1.0))
    assert "reward dict has no key 'accuracy' (reward.key); its keys are ['acc', 'format']" in stats.first_error


@pytest.mark.parametrize("value, message", [
    ("1.0", "reward must be a number or a dict of numbers, got str '1.0'"),
    (float("nan"), "reward must be finite, got nan"),
    (None, "reward must be a number or a dict of numbers, got NoneType None"),
])
def test_unusable_values_are_failures(plugin, value, message):
    plugin.weird = lambda sample: value
    samples = _samples("a")
    stats = compute_rewards(samples, RewardConfig(type="reward_fns:weird", max_failure_fraction=1.0))
    assert stats.num_failed == 1 and stats.first_error == f"sample 0: {message}" and samples[0].reward == 0.0


def test_scalar_reward():
    assert scalar_reward(Sample(reward=1), RewardConfig()) == 1.0
    assert scalar_reward(Sample(reward=True), RewardConfig()) == 1.0
    with pytest.raises(ValueError, match="sample 3 has no reward yet"):
        scalar_reward(Sample(index=3), RewardConfig())
    with pytest.raises(MilesError, match="no key 'acc'"):
        scalar_reward(Sample(reward={"x": 1.0}), RewardConfig(key="acc"))


def test_empty_batch():
    stats = compute_rewards([], RewardConfig(type="f1"))
    assert (stats.num_samples, stats.num_failed, stats.mean_reward) == (0, 0, 0.0)


def test_unknown_reward_type_is_an_error_not_a_failure():
    with pytest.raises(MilesError, match="unknown reward 'f2'"):
        compute_rewards(_samples("a"), RewardConfig(type="f2"))


def test_a_hanging_sync_reward_times_out_without_being_waited_for(plugin):
    import threading
    import time

    release = threading.Event()
    plugin.hangs = lambda sample: release.wait() if sample.index == 1 else 1.0
    start = time.perf_counter()
    samples = _samples("a", "b", "c")
    stats = compute_rewards(samples, RewardConfig(type="reward_fns:hangs", timeout=0.2))
    release.set()
    assert time.perf_counter() - start < 2
    assert (stats.num_failed, stats.first_error) == (1, "sample 1: timed out after 0.2 s (reward.timeout)")
    assert [s.reward for s in samples] == [1.0, 0.0, 1.0]


def test_a_hanging_async_reward_times_out(plugin):
    async def hangs(sample):
        await asyncio.sleep(30 if sample.index == 0 else 0)
        return 1.0

    plugin.hangs = hangs
    stats = compute_rewards(_samples("a", "b", "c"), RewardConfig(type="reward_fns:hangs", timeout=0.1))
    assert (stats.num_failed, stats.first_error) == (1, "sample 0: timed out after 0.1 s (reward.timeout)")


def test_too_many_failures_stop_with_the_first_message(plugin, caplog):
    def broken(sample):
        if sample.index != 2:
            raise RuntimeError("judge unreachable")
        return 1.0

    plugin.broken = broken
    with pytest.raises(MilesError) as err:
        compute_rewards(_samples("a", "b", "c"), RewardConfig(type="reward_fns:broken"))
    assert str(err.value) == ("2 of 3 reward calls failed (reward_fns:broken); first: sample 0: RuntimeError: judge "
                              "unreachable; more than reward.max_failure_fraction = 0.5")
    stats = compute_rewards(_samples("a", "b", "c"), RewardConfig(type="reward_fns:broken", max_failure_fraction=0.7))
    assert stats.num_failed == 2
    assert "2 of 3 reward calls failed (reward_fns:broken); first: sample 0: RuntimeError" in caplog.text
