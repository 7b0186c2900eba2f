"""Native trainer: packing, shared-prefix forward, gradient accumulation, schedule, KL, state."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from miles_core.config import AlgoConfig, TrainConfig
from miles_core.train.batch import (
    TrainBatch,
    micro_batches,
    response_log_probs,
    shared_prefix_log_probs,
    shared_prefix_micro_batches,
)
from miles_core.train.native import NativeTrainer
from miles_core.train.optim import build_optimizer, lr_at
from tests.train.conftest import grouped_tokens


def _grpo_batch(seed: int = 0) -> TrainBatch:
    """3 prompts (lengths 5, 9, 3) x 3 samples with response lengths 1..5 and fixed advantages."""
    tokens, lengths = grouped_tokens(torch.Generator().manual_seed(seed))
    advantages = [torch.full((r,), float(k % 3 - 1)) for k, r in enumerate(lengths)]  # -1, 0, 1 in each group
    return TrainBatch(tokens=tokens, response_lengths=lengths, loss_masks=[torch.ones(r) for r in lengths],
                      advantages=advantages)


def test_micro_batches_respect_the_token_budget():
    lengths = [10, 3, 7, 7, 2, 12]
    groups = micro_batches(lengths, 14)
    # longest first: [12], [10], [7, 7] (2 x 7 = 14), [3, 2]
    assert groups == [[5], [0], [2, 3], [1, 4]]
    assert sorted(i for g in groups for i in g) == list(range(6))


def test_shared_prefix_micro_batches_keep_prompt_groups_together():
    batch = _grpo_batch()
    # costs: group 0 = 5 + 3 x 3 = 14; adding sample 3 (prompt 9, response 4): 2 x 9 + 4 x 4 = 34 > 20
    assert shared_prefix_micro_batches(batch.tokens, batch.response_lengths, 20) == [[0, 1, 2], [3, 4], [5], [6, 7, 8]]


def test_shared_prefix_forward_equals_plain_forward(tiny_model):
    batch = _grpo_batch()
    results = []
    for forward in (response_log_probs, shared_prefix_log_probs):
        model = copy.deepcopy(tiny_model).train()
        logp, entropy = forward(model, batch.tokens, batch.response_lengths, temperature=0.7, chunk_size=4)
        loss = sum((lp * torch.arange(len(lp))).sum() + e.sum() for lp, e in zip(logp, entropy))
        loss.backward()
        results.append((torch.cat(logp), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (plain_lp, plain_grad), (shared_lp, shared_grad) = results
    torch.testing.assert_close(shared_lp, plain_lp, rtol=0, atol=5e-6)
    torch.testing.assert_close(shared_grad, plain_grad, rtol=1e-4, atol=5e-5)


def _trainer(model, **overrides) -> NativeTrainer:
    cfg = TrainConfig(lr=1e-3, **overrides)
    return NativeTrainer(copy.deepcopy(model), cfg, AlgoConfig(), temperature=1.0, total_steps=4)


@pytest.mark.parametrize("share", [True, False])
def test_micro_batching_does_not_change_the_update(tiny_model, share):
    # One optimizer step with everything in one micro-batch vs many small ones: the same loss,
    # gradient norm and accumulated gradient (global denominators, summed micro-batch grads).
    # Gradients are compared, not updated weights: Adam's first step is ~lr * sign(grad), which
    # turns 1e-9 rounding differences in near-zero gradients into lr-sized ones.
    whole = _trainer(tiny_model, max_tokens_per_micro_batch=10_000, share_prompt_prefix=share)
    split = _trainer(tiny_model, max_tokens_per_micro_batch=12, share_prompt_prefix=share)
    m_whole, m_split = whole.train_step(_grpo_batch()), split.train_step(_grpo_batch())
    assert len(split._micro_batches(_grpo_batch())) >= 4
    assert m_split["pg_loss"] == pytest.approx(m_whole["pg_loss"], abs=1e-6)
    assert m_split["grad_norm"] == pytest.approx(m_whole["grad_norm"], rel=1e-5)
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_pg_loss_at_ratio_one_is_minus_mean_advantage(tiny_model):
    # With old = current log-probs the ratio is 1 and the PPO loss is -A per token:
    # token-mean over the response tokens; lengths (1,2,3), (4,5,1), (2,3,4) = 25 tokens, with
    # A = -1, 0, +1 for samples j = 0, 1, 2 of each prompt: A=-1 on 1+4+2 = 7 tokens, A=+1 on
    # 3+1+4 = 8 tokens -> pg_loss = -(8 - 7) / 25 = -0.04.
    metrics = _trainer(tiny_model).train_step(_grpo_batch())
    assert metrics["pg_loss"] == pytest.approx(-0.04, abs=1e-7)
    assert metrics["pg_clipfrac"] == 0.0 and metrics["ppo_kl"] == 0.0


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_schedule="cosine")
    # warmup: 1e-3 * 1/2, 1e-3 * 2/2; cosine over 4 steps: progress 0, .25, .5, .75 ->
    # 1e-4 + 0.5 * 9e-4 * (1 + cos(pi p)) = 1e-3, 8.682e-4, 5.5e-4, 2.318e-4
    got = [lr_at(step, cfg, total_steps=6) for step in range(6)]
    want = [5e-4, 1e-3, 1e-3, 1e-4 + 4.5e-4 * (1 + math.cos(math.pi / 4)), 5.5e-4,
            1e-4 + 4.5e-4 * (1 + math.cos(3 * math.pi / 4))]
    assert got == pytest.approx(want, rel=1e-12)
    assert lr_at(5, TrainConfig(lr=1e-3), total_steps=6) == 1e-3


@pytest.mark.parametrize("fused", [True, False])
def test_an_optimizer_step_moves_every_parameters_version(fused):
    # What caches made from the weights key on (the bf16 casts); the fused kernel (CUDA's choice,
    # forced here on CPU, where it exists too) does not bump them itself.
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    optimizer, _ = build_optimizer(params, TrainConfig(lr=1e-3), total_steps=1, fused=fused)
    before = [p._version for p in params]
    optimizer.step()
    assert optimizer.defaults["fused"] is (True if fused else None)
    assert all(p._version > v for p, v in zip(params, before))
    assert all(torch.all(p < 1) for p in params)  # the step did move them


def test_kl_loss_is_zero_against_an_identical_reference(tiny_model):
    algo = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k3")
    trainer = NativeTrainer(copy.deepcopy(tiny_model), TrainConfig(lr=1e-3), algo, temperature=1.0, total_steps=2,
                            reference=copy.deepcopy(tiny_model).requires_grad_(False))
    first = trainer.train_rollout(_grpo_batch())
    assert first["kl_loss"] == 0.0  # policy == reference before the first update
    second = trainer.train_rollout(_grpo_batch())
    assert second["kl_loss"] > 0.0


def test_several_steps_per_rollout_use_recomputed_old_log_probs(tiny_model):
    trainer = _trainer(tiny_model, num_steps_per_rollout=3)
    batch = _grpo_batch()
    metrics = trainer.train_rollout(batch)
    assert trainer.num_optimizer_steps == 3
    assert batch.old_log_probs is not None and len(batch.old_log_probs) == len(batch)
    assert metrics["ppo_kl"] != 0.0  # steps 2 and 3 see a policy that moved away from the old one


def test_bf16_compute_runs_and_stays_close(tiny_model):
    fp32 = _trainer(tiny_model).train_step(_grpo_batch())
    bf16 = _trainer(tiny_model, compute_dtype="bfloat16").train_step(_grpo_batch())
    assert math.isfinite(bf16["grad_norm"])
    assert bf16["entropy_loss"] == pytest.approx(fp32["entropy_loss"], rel=2e-2)


def test_save_and_load_restore_the_trainer(tiny_model, tmp_path):
    trainer = _trainer(tiny_model)
    trainer.train_step(_grpo_batch())
    trainer.save(tmp_path)
    restored = _trainer(tiny_model)
    restored.load(tmp_path)
    assert restored.num_optimizer_steps == 1
    a, b = trainer.train_step(_grpo_batch(1)), restored.train_step(_grpo_batch(1))
    assert a["grad_norm"] == b["grad_norm"]
    for p, q in zip(trainer.model.parameters(), restored.model.parameters()):
        assert torch.equal(p, q)
