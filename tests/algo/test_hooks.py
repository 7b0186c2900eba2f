"""Plugin contracts: every algo hook kind loads a well-formed plugin through the call site that uses
it, and rejects malformed ones (bad path, import error, not callable, wrong signature, wrong
output) with one clear line naming the hook kind and the path."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from miles_core.algo import (
    estimate_advantages,
    keep_groups,
    policy_loss,
    post_process_rewards,
    resolve_hook,
    resolve_hooks,
)
from miles_core.config import AlgoConfig
from miles_core.errors import MilesError
from miles_core.rewards import REWARDS, resolve_reward

PLUGIN = '''
import torch

def advantage(rewards, group_size, **inputs):
    return rewards * 2

def post_process(rewards, group_size, **inputs):
    return rewards - inputs["response_lengths"].float() / 100

def keep_all_but_first(rewards, group_size, **inputs):
    keep = torch.ones(rewards.numel() // group_size, dtype=torch.bool)
    keep[0] = False
    return keep

def reinforce_loss(cfg, *, log_probs, old_log_probs, advantages, loss_mask):
    return -advantages * log_probs, {}

def half_tis(cfg, *, old_log_probs, rollout_log_probs, loss_mask):
    ones = torch.ones_like(loss_mask)
    return ones * 0.5, ones, {"my_stat": ones}

class Identity:
    def __call__(self, rewards, group_size, **inputs):
        return rewards

identity = Identity()
NOT_CALLABLE = 3

def no_kwargs(rewards, group_size):
    return rewards

def one_arg(rewards, **inputs):
    return rewards

def loss_missing_kw(cfg, *, log_probs, advantages):
    return log_probs, {}

def tis_positional(cfg, old_log_probs, rollout_log_probs):
    return old_log_probs

def wrong_shape_advantage(rewards, group_size, **inputs):
    return rewards[:1]

def scalar_post_process(rewards, group_size, **inputs):
    return rewards.sum()

def float_filter(rewards, group_size, **inputs):
    return torch.ones(rewards.numel())

def scalar_loss(cfg, **tensors):
    return tensors["log_probs"].sum()

def mask_only_tis(cfg, **tensors):
    return tensors["loss_mask"]

def exact(sample):
    return 1.0

def two_args(args, sample):
    return 1.0
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "algo_plugins.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "broken_algo_plugins.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "algo_plugins"
    for name in ("algo_plugins", "broken_algo_plugins"):
        sys.modules.pop(name, None)


MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
LOGP = torch.tensor([[0.1, 0.2], [-0.5, 0.0]])
ADV = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])


def _loss(cfg, **extra):
    return policy_loss(cfg, log_probs=LOGP, old_log_probs=torch.zeros(2, 2), advantages=ADV, loss_mask=MASK,
                       num_tokens=3, num_seqs=2, **extra)


# -- well-formed plugins, through the call site of each kind ----------------------------------------

@pytest.mark.parametrize("path", ["algo_plugins:advantage", "algo_plugins.advantage"])
def test_advantage_hook(plugins, path):
    # rewards [1, 0] * 2 broadcast over trained tokens
    adv, _ = estimate_advantages(AlgoConfig(custom_advantage_function=path), torch.tensor([1.0, 0.0]), 2,
                                 loss_mask=MASK)
    assert adv.tolist() == [[2.0, 2.0], [0.0, 0.0]]


def test_reward_post_process_hook(plugins):
    # [1, 0] - lengths [10, 50] / 100 = [.9, -.5]
    cfg = AlgoConfig(reward_post_process="algo_plugins:post_process")
    out = post_process_rewards(cfg, torch.tensor([1.0, 0.0]), 2, response_lengths=torch.tensor([10, 50]),
                               max_response_len=64)
    torch.testing.assert_close(out, torch.tensor([0.9, -0.5]))


def test_dynamic_filter_hook(plugins):
    cfg = AlgoConfig(dynamic_sampling=True, dynamic_filter="algo_plugins:keep_all_but_first")
    assert keep_groups(cfg, torch.tensor([1.0, 0.0, 1.0, 0.0]), 2).tolist() == [False, True]


def test_loss_hook(plugins):
    # -A * logp = [[-.1, -.2], [-.5, pad]] -> -.8 / 3 tokens; no `clipped` stat -> no pg_clipfrac
    loss, metrics = _loss(AlgoConfig(custom_loss_function="algo_plugins:reinforce_loss"))
    assert loss.item() == pytest.approx(-0.8 / 3)
    assert "pg_clipfrac" not in metrics


def test_tis_hook(plugins):
    # weights .5 everywhere: half the PPO loss (-1.10517 - 1.2 + .8) / 3; the hook's stat is reduced like ours
    cfg = AlgoConfig(use_tis=True, custom_tis_function="algo_plugins:half_tis")
    loss, metrics = _loss(cfg, rollout_log_probs=torch.zeros(2, 2))
    assert loss.item() == pytest.approx(0.5 * (-math.exp(0.1) - 1.2 + 0.8) / 3)
    assert metrics["my_stat"] == pytest.approx(1.0) and metrics["tis_weight"] == pytest.approx(0.5)


def test_resolve_hooks_at_start_up(plugins):
    cfg = AlgoConfig(reward_post_process="algo_plugins:identity", custom_advantage_function="algo_plugins:advantage",
                     dynamic_sampling=True, dynamic_filter="algo_plugins:keep_all_but_first",
                     custom_loss_function="algo_plugins:reinforce_loss", use_tis=True,
                     custom_tis_function="algo_plugins:half_tis")
    hooks = resolve_hooks(cfg)
    assert hooks.loss.__name__ == "reinforce_loss" and hooks.tis.__name__ == "half_tis"
    assert all(callable(h) for h in (hooks.reward_post_process, hooks.advantage, hooks.dynamic_filter))
    assert resolve_hooks(AlgoConfig()).advantage is None
    with pytest.raises(MilesError, match="loss hook"):
        resolve_hooks(AlgoConfig(custom_loss_function="algo_plugins:no_kwargs"))


# -- malformed plugins: rejected when resolved -------------------------------------------------------

ADV_HOOK = "advantage hook (algo.custom_advantage_function)"
POST_HOOK = "reward post-process hook (algo.reward_post_process)"
FILTER_HOOK = "dynamic filter hook (algo.dynamic_filter)"
LOSS_HOOK = "loss hook (algo.custom_loss_function)"
TIS_HOOK = "TIS hook (algo.custom_tis_function)"


@pytest.mark.parametrize("kind, path, message", [
    ("advantage", "algo_plugins:NOT_CALLABLE",
     f"{ADV_HOOK} 'algo_plugins:NOT_CALLABLE' is not callable (it is int 3)"),
    ("advantage", "algo_plugins:no_kwargs", f"{ADV_HOOK} 'algo_plugins:no_kwargs' must take (rewards, group_size, "
                                            "**inputs), but its signature is (rewards, group_size)"),
    ("advantage", "algo_plugins:", f"{ADV_HOOK} path 'algo_plugins:' must look like 'package.module:function'"),
    ("reward_post_process", "algo_plugins:one_arg", f"{POST_HOOK} 'algo_plugins:one_arg' must take (rewards, "
                                                    "group_size, **inputs), but its signature is (rewards, **inputs)"),
    ("dynamic_filter", "algo_plugins:keep_all_but_firs", f"{FILTER_HOOK} 'algo_plugins:keep_all_but_firs': "
                     "'algo_plugins' has no attribute 'keep_all_but_firs' (did you mean 'keep_all_but_first'?)"),
    ("loss", "algo_plugins:loss_missing_kw", f"{LOSS_HOOK} 'algo_plugins:loss_missing_kw' must take (cfg, *, "
                                             "log_probs, old_log_probs, advantages, loss_mask), but its signature is "
                                             "(cfg, *, log_probs, advantages)"),
    ("loss", "myloss", f"{LOSS_HOOK} 'myloss' must be a 'package.module:function' path"),
    ("tis", "algo_plugins:tis_positional", f"{TIS_HOOK} 'algo_plugins:tis_positional' must take (cfg, *, "
                                           "old_log_probs, rollout_log_probs, loss_mask), but its signature is "
                                           "(cfg, old_log_probs, rollout_log_probs)"),
    ("tis", "broken_algo_plugins:f", f"{TIS_HOOK} 'broken_algo_plugins:f': cannot import module "
                                     "'broken_algo_plugins' (ModuleNotFoundError: No module named "
                                     "'not_a_real_dependency_xyz')"),
])
def test_malformed_hooks_are_rejected(plugins, kind, path, message):
    with pytest.raises(MilesError) as info:
        resolve_hook(path, kind)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_callable_object_hook(plugins):
    assert resolve_hook("algo_plugins:identity", "reward_post_process")(torch.ones(2), 2).tolist() == [1.0, 1.0]


# -- malformed plugins: rejected when their output has the wrong shape ------------------------------

def test_hook_outputs_are_checked(plugins):
    rewards = torch.tensor([1.0, 0.0])
    with pytest.raises(MilesError, match=r"'algo_plugins:wrong_shape_advantage' returned \(1,\); expected a tensor "
                                         r"of shape \(N,\) or \(N, T\) = \(2,\) or \(2, 2\)"):
        estimate_advantages(AlgoConfig(custom_advantage_function="algo_plugins:wrong_shape_advantage"), rewards, 2,
                            loss_mask=MASK)
    with pytest.raises(MilesError, match=r"'algo_plugins:scalar_post_process' returned \(\); expected .* \(2,\)"):
        post_process_rewards(AlgoConfig(reward_post_process="algo_plugins:scalar_post_process"), rewards, 2,
                             response_lengths=torch.tensor([1, 1]), max_response_len=4)
    with pytest.raises(MilesError, match=r"returned torch.float32 \(2,\); expected a bool tensor of shape \(G,\)"):
        keep_groups(AlgoConfig(dynamic_sampling=True, dynamic_filter="algo_plugins:float_filter"), rewards, 2)
    with pytest.raises(MilesError, match=r"'algo_plugins:scalar_loss' must return \(per-token loss of shape \(2, 2\)"):
        _loss(AlgoConfig(custom_loss_function="algo_plugins:scalar_loss"))
    with pytest.raises(MilesError, match=r"'algo_plugins:mask_only_tis' must return \(weights, keep, stats\)"):
        _loss(AlgoConfig(use_tis=True, custom_tis_function="algo_plugins:mask_only_tis"),
              rollout_log_probs=torch.zeros(2, 2))


# -- the reward kind: same resolver, same messages as the reward registry ---------------------------

@pytest.mark.parametrize("path", ["algo_plugins:exact", "boxed", "algo_plugins:two_args", "algo_plugins:exactt",
                                  "algo_plugins:NOT_CALLABLE", "broken_algo_plugins:f", "algo_plugins:", "mathh"])
def test_reward_kind_matches_reward_registry(plugins, path):
    try:
        expected = resolve_reward(path)
    except MilesError as err:
        with pytest.raises(MilesError) as info:
            resolve_hook(path, "reward", registry=REWARDS)
        assert str(info.value) == str(err)
    else:
        assert resolve_hook(path, "reward", registry=REWARDS) is expected
