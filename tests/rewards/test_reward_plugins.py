"""Plugin contract: reward functions named by a dotted path load, or fail with one clear line."""

from __future__ import annotations

import textwrap

import pytest

from miles_core.config import RewardConfig
from miles_core.errors import MilesError
from miles_core.rewards import REWARDS, compute_rewards, resolve_reward
from miles_core.sample import Sample

PLUGIN = '''
import asyncio

def exact(sample):
    return float(sample.response == sample.label)

async def exact_async(sample):
    await asyncio.sleep(0)
    return {"acc": float(sample.response == sample.label), "length": len(sample.response)}

class Judge:
    def __call__(self, sample):
        return 1.0

judge = Judge()
NOT_CALLABLE = 3

def two_args(args, sample):
    return 1.0
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "broken_rewards.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_registry_names():
    assert set(REWARDS) == {"math", "boxed", "f1", "last_number", "deepscaler", "dapo"}
    assert resolve_reward("boxed") is REWARDS["boxed"]


@pytest.mark.parametrize("path", ["my_rewards:exact", "my_rewards.exact"])
def test_sync_plugin(plugin_dir, path):
    samples = [Sample(index=0, response="4", label="4"), Sample(index=1, response="5", label="4")]
    stats = compute_rewards(samples, RewardConfig(type=path))
    assert [s.reward for s in samples] == [1.0, 0.0]
    assert stats.num_failed == 0 and stats.mean_reward == 0.5


def test_async_plugin_with_dict_key(plugin_dir):
    samples = [Sample(index=i, response=r, label="4") for i, r in enumerate(["4", "44", "4"])]
    stats = compute_rewards(samples, RewardConfig(type="my_rewards:exact_async", key="acc", max_concurrency=2))
    assert [s.reward for s in samples] == [{"acc": 1.0, "length": 1}, {"acc": 0.0, "length": 2}, {"acc": 1.0, "length": 1}]
    assert stats.mean_reward == pytest.approx(2 / 3) and stats.num_failed == 0


def test_callable_object_plugin(plugin_dir):
    assert resolve_reward("my_rewards:judge")(Sample()) == 1.0


@pytest.mark.parametrize("path, message", [
    ("my_rewards:exactt", "reward 'my_rewards:exactt': 'my_rewards' has no attribute 'exactt' (did you mean 'exact'?)"),
    ("my_rewards:NOT_CALLABLE", "reward 'my_rewards:NOT_CALLABLE' is not callable (it is int 3)"),
    ("my_rewards:two_args", "reward 'my_rewards:two_args' must take one argument (the Sample), but its signature is (args, sample)"),
    ("no_such_module_xyz:f", "reward 'no_such_module_xyz:f': cannot import module 'no_such_module_xyz' "
                             "(ModuleNotFoundError: No module named 'no_such_module_xyz')"),
    ("broken_rewards:f", "reward 'broken_rewards:f': cannot import module 'broken_rewards' "
                         "(ModuleNotFoundError: No module named 'not_a_real_dependency_xyz')"),
    ("my_rewards:", "reward path 'my_rewards:' must look like 'package.module:function'"),
    ("mathh", "unknown reward 'mathh' (did you mean 'math'?); expected one of: boxed, dapo, deepscaler, f1, last_number, math, "
              "or a 'package.module:function' path"),
])
def test_malformed_plugins(plugin_dir, path, message):
    with pytest.raises(MilesError) as info:
        resolve_reward(path)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
