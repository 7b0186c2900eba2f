"""Native trainer with the algorithm library: TIS/GSPO/value losses exact under micro-batching,
the PPO critic's positions, the reference model's refresh, and multi-step metric merging."""

from __future__ import annotations

import copy

import pytest
import torch

from miles_core.config import AlgoConfig, TrainConfig
from miles_core.train import build_trainer
from miles_core.train.batch import TrainBatch
from miles_core.train.critic import ValueModel
from miles_core.train.native import mean_over_steps
from tests.train.conftest import grouped_tokens


def _batch(seed: int = 0) -> TrainBatch:
    """3 prompts x 3 samples, response lengths 1..5, per-token advantages, noisy rollout log-probs
    (filled in by `_with_rollout_log_probs`), a masked-out token in sample 4."""
    gen = torch.Generator().manual_seed(seed)
    tokens, lengths = grouped_tokens(gen)
    masks = [torch.ones(r) for r in lengths]
    masks[4][1] = 0.0
    advantages = [torch.randn(r, generator=gen) for r in lengths]
    return TrainBatch(tokens=tokens, response_lengths=lengths, loss_masks=masks, advantages=advantages)


def _with_rollout_log_probs(batch: TrainBatch, model, seed: int = 1) -> TrainBatch:
    """The engine's log-probs = the trainer's + noise of up to +-1 nat, so TIS weights differ from 1."""
    gen = torch.Generator().manual_seed(seed)
    trainer = build_trainer(TrainConfig(), AlgoConfig(), copy.deepcopy(model), temperature=1.0, total_steps=1)
    batch.rollout_log_probs = [lp + 2.0 * (torch.rand(lp.shape, generator=gen) - 0.5)
                               for lp in trainer.compute_log_probs(batch)]
    return batch


def _pair(model, algo: AlgoConfig, **train):
    """Two identical trainers: everything in one micro-batch, and 12-token micro-batches."""
    torch.manual_seed(0)
    whole = build_trainer(TrainConfig(lr=1e-3, max_tokens_per_micro_batch=10_000, **train), algo,
                          copy.deepcopy(model), temperature=1.0, total_steps=4)
    split = build_trainer(TrainConfig(lr=1e-3, max_tokens_per_micro_batch=12, **train), algo,
                          copy.deepcopy(model), temperature=1.0, total_steps=4)
    return whole, split


def _assert_same_update(whole, split, m_whole, m_split, keys):
    for key in keys:
        assert m_split[key] == pytest.approx(m_whole[key], rel=1e-5, abs=1e-6), key
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algo", [
    AlgoConfig(use_tis=True, tis_batch_normalize=True),  # token-level TIS, normalised over the step
    AlgoConfig(use_tis=True, tis_level="geometric", tis_mode="mask", tis_clip_low=0.8, tis_clip_high=1.2,
               tis_batch_normalize=True, loss_agg_mode="seq_mean_token_mean"),
    AlgoConfig(use_tis=True, tis_level="sequence", tis_mode="clip", tis_clip_low=0.5, tis_clip_high=1.5,
               use_rs=True, rs_level="token", rs_clip_low=0.7, rs_clip_high=1.3),
    AlgoConfig(advantage_estimator="gspo", policy_loss="gspo", eps_clip=3e-4, eps_clip_high=4e-4,
               loss_agg_mode="seq_mean_token_mean", use_tis=True),
], ids=["tis-token-normalized", "mis-geometric", "tis-sequence-rs", "gspo"])
def test_tis_and_sequence_losses_are_exact_under_micro_batching(tiny_model, algo):
    # Per-row weights and the step's batch mean are computed on whole sequences, so the loss, the
    # TIS statistics and the gradients do not depend on how the step is cut into micro-batches.
    whole, split = _pair(tiny_model, algo)
    batch = _with_rollout_log_probs(_batch(), tiny_model)
    assert len(split._micro_batches(batch)) >= 4
    m_whole, m_split = whole.train_rollout(copy.deepcopy(batch)), split.train_rollout(copy.deepcopy(batch))
    assert 0 < m_whole["tis_masked_frac"] + m_whole["tis_clipfrac"]  # the weights are doing something
    assert m_whole["tis_ratio_min"] < 1 < m_whole["tis_ratio_max"]
    assert m_whole["train_rollout_logprob_abs_diff"] > 0.05  # the trainer's measurement, not policy_loss's
    keys = ["loss", "pg_loss", "tis", "tis_weight", "tis_clipfrac", "tis_masked_frac", "tis_ratio_min",
            "tis_ratio_max", "grad_norm", "train_rollout_logprob_abs_diff"]
    _assert_same_update(whole, split, m_whole, m_split, keys + (["tis_batch_mean"] if algo.tis_batch_normalize else []))


def test_tis_batch_normalization_makes_the_mean_weight_one(tiny_model):
    # With normalisation the mean of the applied token weights over the step is 1 (token level,
    # truncate mode keeps every token): tis_weight is that mean.
    trainer, _ = _pair(tiny_model, AlgoConfig(use_tis=True, tis_batch_normalize=True, tis_clip_high=1.1))
    metrics = trainer.train_rollout(_with_rollout_log_probs(_batch(), tiny_model))
    assert metrics["tis_weight"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["tis_batch_mean"] < 1.0  # truncation at 1.1 pulled the raw mean down


def _ppo_batch(trainer, seed: int = 0) -> TrainBatch:
    batch = _batch(seed)
    gen = torch.Generator().manual_seed(seed + 7)
    old = trainer.compute_values(batch)
    batch.values = [v + 0.3 * torch.randn(v.shape, generator=gen) for v in old]  # some beyond value_clip
    batch.returns = [torch.randn(v.shape, generator=gen) for v in old]
    return batch


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_value_loss_is_exact_under_micro_batching(tiny_model, agg):
    algo = AlgoConfig(advantage_estimator="ppo", value_clip=0.2, value_loss_coef=0.5, loss_agg_mode=agg)
    whole, split = _pair(tiny_model, algo)
    for trainer in (whole, split):  # a non-zero head, so the trunk gets value gradients too
        head = trainer.critic.model.value_head.weight
        torch.nn.init.normal_(head, std=0.5, generator=torch.Generator().manual_seed(3))
    batch = _ppo_batch(whole)
    m_whole, m_split = whole.train_rollout(copy.deepcopy(batch)), split.train_rollout(copy.deepcopy(batch))
    assert m_whole["value_loss"] > 0 and 0 < m_whole["value_clipfrac"] < 1
    assert m_whole["value_grad_norm"] > 0
    _assert_same_update(whole, split, m_whole, m_split, ["loss", "pg_loss", "value_loss", "value_clipfrac",
                                                        "value_grad_norm", "grad_norm"])
    for a, b in zip(whole.critic.model.parameters(), split.critic.model.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_value_loss_trains_only_the_critic_and_matches_the_formula(tiny_model):
    # Zero-initialised head: V = 0 everywhere. With value_clip = 0 and token_mean the value loss is
    # mean over trained tokens of (0 - R)^2; with zero advantages the policy gets no gradient.
    algo = AlgoConfig(advantage_estimator="ppo", value_clip=0.0, value_loss_coef=0.5)
    trainer = build_trainer(TrainConfig(lr=1e-3), algo, copy.deepcopy(tiny_model), temperature=1.0, total_steps=1)
    batch = _batch()
    batch.advantages = [torch.zeros(r) for r in batch.response_lengths]
    batch.values = trainer.compute_values(batch)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in batch.values)
    batch.returns = [torch.full((r,), 2.0) for r in batch.response_lengths]
    metrics = trainer.train_rollout(batch)
    assert metrics["value_loss"] == pytest.approx(4.0)  # (0 - 2)^2 on every trained token
    assert metrics["loss"] == pytest.approx(0.5 * 4.0)
    assert metrics["grad_norm"] == 0.0 and metrics["value_grad_norm"] > 0
    # the head moved; the policy did not
    assert trainer.critic.model.value_head.bias.item() != 0.0


@pytest.mark.parametrize("share", [True, False])
def test_values_are_read_before_each_response_token(tiny_model, share):
    # The value of response token t comes from the hidden state that predicts t: it sees the
    # prompt and tokens < t. Changing response token 2 changes values from position 3 on only.
    model = ValueModel(tiny_model, share_prompt_prefix=share)
    torch.nn.init.normal_(model.value_head.weight, generator=torch.Generator().manual_seed(0))
    prompt, response = torch.tensor([5, 17, 33, 2]), torch.tensor([9, 40, 41, 42, 43])
    edited = response.clone()
    edited[2] = 77
    with torch.no_grad():
        a, b = model([torch.cat([prompt, response]), torch.cat([prompt, edited])], [5, 5])
    torch.testing.assert_close(a[:3], b[:3], rtol=0, atol=1e-6)
    assert (a[3:] - b[3:]).abs().min() > 1e-6


def test_plain_and_shared_prefix_values_agree(tiny_model):
    batch = _batch()
    values = []
    for share in (True, False):
        trainer = build_trainer(TrainConfig(share_prompt_prefix=share), AlgoConfig(advantage_estimator="ppo"),
                                copy.deepcopy(tiny_model), temperature=1.0, total_steps=1)
        torch.nn.init.normal_(trainer.critic.model.value_head.weight, generator=torch.Generator().manual_seed(0))
        values.append(torch.cat(trainer.compute_values(batch)))
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-5)


def test_kl_reward_keeps_a_reference_that_update_reference_refreshes(tiny_model):
    algo = AlgoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.1, ref_update_interval=1)
    trainer = build_trainer(TrainConfig(lr=1e-2), algo, copy.deepcopy(tiny_model), temperature=1.0, total_steps=2)
    assert trainer.reference is not None and trainer.critic is None
    batch = _batch()
    trainer.train_rollout(copy.deepcopy(batch))
    policy, reference = trainer.compute_log_probs(batch), trainer.compute_log_probs(batch, reference=True)
    assert not torch.equal(torch.cat(policy), torch.cat(reference))  # the policy moved, the reference did not
    trainer.update_reference()
    assert torch.equal(torch.cat(trainer.compute_log_probs(batch, reference=True)), torch.cat(policy))


def test_optimizer_steps_of_a_rollout_merge_by_mean_min_and_max():
    merged = mean_over_steps([{"pg_loss": 1.0, "tis_ratio_min": 0.5, "tis_ratio_max": 2.0},
                              {"pg_loss": 3.0, "tis_ratio_min": 0.7, "tis_ratio_max": 1.5}])
    assert merged == {"pg_loss": 2.0, "tis_ratio_min": 0.5, "tis_ratio_max": 2.0}
