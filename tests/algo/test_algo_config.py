"""`AlgoConfig`: its choices match the algo registries, and bad combinations fail with one clear line."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from miles_core.algo import ADVANTAGE_ESTIMATORS, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from miles_core.algo.advantages import KL_REWARD_ESTIMATORS
from miles_core.algo.hooks import HOOK_KEYS
from miles_core.config import AlgoConfig


def _choices(name: str) -> set[str]:
    return set(typing.get_args(typing.get_type_hints(AlgoConfig)[name]))


def test_literals_match_registries():
    assert _choices("advantage_estimator") == set(ADVANTAGE_ESTIMATORS)
    assert _choices("policy_loss") == set(POLICY_LOSSES)
    assert _choices("loss_agg_mode") == set(AGGREGATIONS)
    assert _choices("kl_loss_type") == set(KL_ESTIMATORS)
    assert _choices("tis_level") == _choices("rs_level") == {"token", "sequence", "geometric"}
    assert _choices("tis_mode") == {"truncate", "clip", "mask"}


def test_every_field_is_documented_and_hooks_exist():
    import ast
    import inspect

    source = inspect.getsource(AlgoConfig)
    body = ast.parse(source).body[0].body
    documented = {node.target.id for node, nxt in zip(body, body[1:])
                  if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)}
    assert {f.name for f in dataclasses.fields(AlgoConfig)} <= documented
    assert set(HOOK_KEYS.values()) <= {f.name for f in dataclasses.fields(AlgoConfig)}


def test_kl_reward_estimators_agree_with_validation():
    for name in ADVANTAGE_ESTIMATORS:
        kwargs = {"policy_loss": "gspo"} if name == "gspo" else {}
        if name in KL_REWARD_ESTIMATORS:
            AlgoConfig(advantage_estimator=name, kl_coef=0.1)
        else:
            with pytest.raises(ValueError, match="kl_coef"):
                AlgoConfig(advantage_estimator=name, kl_coef=0.1, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"eps_clip": 1.5}, "eps_clip must be in [0, 1], got 1.5"),
    ({"gamma": 1.1}, "gamma must be in [0, 1], got 1.1"),
    ({"value_clip": -1.0}, "value_clip must be >= 0, got -1.0"),
    ({"loss_agg_mode": "seq_mean_token_sum_norm"}, "loss_scale_factor must be > 0 with loss_agg_mode "
                                                   "'seq_mean_token_sum_norm' (the Dr. GRPO constant"),
    ({"advantage_estimator": "gspo"}, "advantage_estimator 'gspo' needs policy_loss = 'gspo', got 'ppo_clip'"),
    ({"kl_coef": 0.1}, "kl_coef (0.1) shapes rewards only for advantage_estimator ppo, reinforce_plus_plus, "
                       "reinforce_plus_plus_baseline; got 'grpo' (use use_kl_loss + kl_loss_coef instead)"),
    ({"use_unbiased_kl": True}, "use_unbiased_kl needs use_kl_loss = true"),
    ({"ref_update_interval": 5}, "ref_update_interval needs a reference model: set use_kl_loss or kl_coef > 0"),
    ({"use_tis": True, "tis_clip_low": 2.0}, "tis_clip_low and tis_clip_high must satisfy 0 <= low < high, "
                                             "got 2.0 and 2.0"),
    ({"use_rs": True, "rs_clip_high": 0.1}, "rs_clip_low and rs_clip_high must satisfy 0 <= low < high"),
    ({"use_tis": True, "tis_veto_threshold": 1.0}, "tis_veto_threshold must be in [0, 1), got 1.0"),
    ({"tis_veto_threshold": 1e-4}, "tis_veto_threshold needs use_tis or use_rs"),
    ({"tis_batch_normalize": True}, "tis_batch_normalize needs use_tis = true"),
    ({"custom_tis_function": "m:f"}, "custom_tis_function needs use_tis = true"),
    ({"max_dynamic_sampling_rounds": 0}, "max_dynamic_sampling_rounds must be >= 1, got 0"),
    ({"dynamic_filter": "m:f"}, "dynamic_filter needs dynamic_sampling = true"),
    ({"overlong_buffer_len": -1}, "overlong_buffer_len must be >= 0, got -1"),
])
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as info:
        AlgoConfig(**kwargs)
    assert str(info.value).startswith(message)


def test_valid_recipes_of_each_family():
    AlgoConfig(advantage_estimator="gspo", policy_loss="gspo", eps_clip=3e-4, eps_clip_high=4e-4)
    AlgoConfig(policy_loss="cispo", eps_clip=1.0, eps_clip_high=0.28)
    AlgoConfig(advantage_estimator="ppo", gamma=0.99, lambd=0.95, kl_coef=0.01, ref_update_interval=10)
    AlgoConfig(dynamic_sampling=True, over_sampling_batch_size=12, overlong_buffer_len=64, eps_clip_high=0.28,
               loss_agg_mode="seq_mean_token_sum_norm", loss_scale_factor=512)
    AlgoConfig(use_tis=True, tis_level="geometric", tis_mode="mask", tis_clip_low=0.999, tis_clip_high=1.001,
               tis_veto_threshold=1e-4, tis_batch_normalize=True, use_rs=True)
