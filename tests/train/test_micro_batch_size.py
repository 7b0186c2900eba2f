"""`train.micro_batch_size` (slime's `--micro-batch-size`): a sample cap on top of the token
budget in every micro-batch builder; gradient accumulation makes the update independent of it."""

from __future__ import annotations

import copy

import pytest
import torch

from miles_core.config import AlgoConfig, TrainConfig
from miles_core.train.batch import micro_batches, shared_prefix_micro_batches
from miles_core.train.native import NativeTrainer
from miles_core.train.packing import packed_micro_batches
from tests.train.test_trainer_math import _grpo_batch


def test_micro_batches_cap():
    lengths = [10, 3, 7, 7, 2, 12]
    # budget alone (see test_trainer_math): [12], [10], [7, 7], [3, 2]; a cap of 1 splits the pairs
    assert micro_batches(lengths, 14, max_samples=1) == [[5], [0], [2], [3], [1], [4]]
    # a large budget: longest first, three at a time
    assert micro_batches(lengths, 1000, max_samples=3) == [[5, 0, 2], [3, 1, 4]]
    assert micro_batches(lengths, 1000) == [[5, 0, 2, 3, 1, 4]]


def test_shared_prefix_micro_batches_cap():
    batch = _grpo_batch()
    # 3 prompt groups of 3: the budget alone keeps all 9 in one; a cap of 2 cuts every 2 samples
    assert shared_prefix_micro_batches(batch.tokens, batch.response_lengths, 10_000) == [list(range(9))]
    assert shared_prefix_micro_batches(batch.tokens, batch.response_lengths, 10_000, max_samples=2) == \
        [[0, 1], [2, 3], [4, 5], [6, 7], [8]]


@pytest.mark.parametrize("share", [True, False])
def test_packed_micro_batches_cap(share):
    batch = _grpo_batch()
    assert packed_micro_batches(batch.tokens, batch.response_lengths, 10_000, share) == [list(range(9))]
    assert packed_micro_batches(batch.tokens, batch.response_lengths, 10_000, share, max_samples=4) == \
        [[0, 1, 2, 3], [4, 5, 6, 7], [8]]


def _step(model, **train):
    trainer = NativeTrainer(copy.deepcopy(model), TrainConfig(lr=1e-3, **train), AlgoConfig(),
                            temperature=1.0, total_steps=1)
    metrics = trainer.train_step(_grpo_batch())
    return trainer, metrics


@pytest.mark.parametrize("pack, share", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("cap", [1, 2])
def test_cap_holds_and_gradients_are_unchanged(tiny_model, pack, share, cap):
    # Same batch, one optimizer step: all 9 samples in one micro-batch vs at most `cap` per
    # micro-batch; loss, gradient norm and accumulated gradients agree to rounding.
    options = dict(max_tokens_per_micro_batch=10_000, pack_sequences=pack, share_prompt_prefix=share)
    whole, m_whole = _step(tiny_model, **options)
    capped, m_capped = _step(tiny_model, micro_batch_size=cap, **options)
    groups = capped._micro_batches(_grpo_batch())
    assert max(len(g) for g in groups) == cap and len(groups) == -(-9 // cap)
    assert len(whole._micro_batches(_grpo_batch())) == 1
    assert m_capped["pg_loss"] == pytest.approx(m_whole["pg_loss"], abs=1e-6)
    assert m_capped["grad_norm"] == pytest.approx(m_whole["grad_norm"], rel=1e-5)
    for a, b in zip(whole.model.parameters(), capped.model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_micro_batch_size_is_validated():
    with pytest.raises(ValueError, match="micro_batch_size must be >= 0, got -1"):
        TrainConfig(micro_batch_size=-1)
