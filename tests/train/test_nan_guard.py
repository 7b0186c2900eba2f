"""The skip-step guard (issue 21, item 4): a NaN/Inf loss or gradient norm skips the optimizer
step (no update, no scheduler step), names the offending samples, and stops the run after
`train.max_bad_steps` in a row; the weight check stays as the last line of defence."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from miles_core.config import AlgoConfig, TrainConfig
from miles_core.errors import MilesError
from miles_core.train.finite import check_finite_weights
from miles_core.train.native import NativeTrainer

from tests.train.test_trainer_math import _grpo_batch


def _trainer(model, **train) -> NativeTrainer:
    cfg = TrainConfig(lr=1e-3, max_tokens_per_micro_batch=16, **train)
    return NativeTrainer(copy.deepcopy(model), cfg, AlgoConfig(), temperature=1.0, total_steps=10)


def _nan_advantage(batch, row: int):
    batch.advantages[row] = batch.advantages[row].clone()
    batch.advantages[row][0] = math.nan
    return batch


def test_a_nan_advantage_skips_the_step_and_names_the_sample(tiny_model):
    trainer = _trainer(tiny_model)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.train_rollout(_nan_advantage(_grpo_batch(), 4))
    assert metrics["skipped_step"] == 1.0 and not math.isfinite(metrics["loss"])
    assert trainer.skipped_notes() == ["loss nan, grad norm nan; samples 4"]
    assert trainer.num_optimizer_steps == 0 and trainer.scheduler.last_epoch == 0  # scheduler not stepped
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(p.grad is None for p in trainer.model.parameters())  # nothing left to leak into the next step
    good = trainer.train_rollout(_grpo_batch())  # the next good batch trains as usual
    assert good["skipped_step"] == 0.0 and trainer.num_optimizer_steps == 1 and trainer.guard.in_row == 0


def test_max_bad_steps_in_a_row_stop_with_a_clear_error(tiny_model):
    trainer = _trainer(tiny_model, max_bad_steps=2)
    trainer.train_rollout(_nan_advantage(_grpo_batch(), 0))
    with pytest.raises(MilesError, match=r"2 optimizer steps in a row had a non-finite loss or gradient norm "
                                         r"\(train.max_bad_steps = 2\); last: loss nan, grad norm nan; samples 0"):
        trainer.train_rollout(_nan_advantage(_grpo_batch(), 0))


def test_a_nan_gradient_with_a_finite_loss_is_skipped_too(tiny_model):
    trainer = _trainer(tiny_model)
    hook = trainer.model.model.norm.weight.register_hook(lambda grad: grad * math.nan)
    metrics = trainer.train_rollout(_grpo_batch())
    hook.remove()
    assert metrics["skipped_step"] == 1.0 and math.isfinite(metrics["loss"]) and math.isnan(metrics["grad_norm"])
    assert trainer.skipped_notes()[0].endswith("not traced to a sample (finite loss)")


def test_the_bad_step_count_is_saved_with_the_trainer(tiny_model, tmp_path):
    trainer = _trainer(tiny_model)
    trainer.train_rollout(_nan_advantage(_grpo_batch(), 0))
    trainer.save(tmp_path)
    restored = _trainer(tiny_model)
    restored.load(tmp_path)
    assert restored.guard.in_row == 1


def test_non_finite_weights_are_still_refused_before_sync_and_save():
    weights = [("a", torch.ones(2)), ("b", torch.tensor([1.0, math.inf]))]
    with pytest.raises(MilesError, match="step 3: weight 'b' holds inf after the update; stopped before the weight sync"):
        check_finite_weights(weights, 3)


def test_the_first_non_finite_weight_is_named_across_dtypes_and_huge_finite_ones_pass():
    huge = ("huge", torch.full((4,), 3e38))  # finite, though the squares of its norm overflow
    check_finite_weights([("a", torch.ones(2)), huge, ("ids", torch.arange(3)), ("empty", torch.zeros(0)),
                          ("h", torch.ones(2, dtype=torch.bfloat16))], 1)
    weights = [huge, ("h", torch.tensor([1.0, math.nan], dtype=torch.bfloat16)), ("b", torch.tensor([math.inf]))]
    with pytest.raises(MilesError, match="step 4: weight 'h' holds nan after the update"):
        check_finite_weights(weights, 4)
    with pytest.raises(MilesError, match="step 5: weight 'b' holds inf after the update"):
        check_finite_weights([huge, ("b", torch.tensor([1.0, -math.inf])), ("c", torch.tensor([math.nan]))], 5)


def test_weights_made_for_the_check_are_checked_a_window_at_a_time(monkeypatch):
    from miles_core.train import finite

    monkeypatch.setattr(finite, "WINDOW_BYTES", 32)  # two 16-byte tensors a window
    made = []

    def gathered():  # FSDP's full tensors, made one by one
        for i in range(6):
            made.append(i)
            yield f"w{i}", torch.full((4,), math.nan if i == 1 else 1.0)

    with pytest.raises(MilesError, match="weight 'w1' holds nan"):
        check_finite_weights(gathered(), 2)
    assert made == [0, 1]  # stopped at the first window, the rest never made
