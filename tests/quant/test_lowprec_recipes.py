"""The low-precision recipes end to end on CPU: INT4 QAT + INT4 rollout is bitwise on-policy
(KL = 0, every step, weights moving); without QAT the INT4 engine drifts from the trainer; FP8
rollout trains with a measured gap; `qwen3-moe-fp8` says what it needs in one line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.metrics import read_metrics

runner = CliRunner()
# Rewards that vary within a group, so advantages and gradients are non-zero and the weights move.
CHARS_REWARD = "def reward(sample):\n    return len(set(sample.response)) / 10\n"


@pytest.fixture
def reward(tmp_path, monkeypatch):
    (tmp_path / "miles_test_chars_reward.py").write_text(CHARS_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "reward.type=miles_test_chars_reward:reward"


def run(tmp_path, reward, recipe, *overrides):
    out = tmp_path / "run"
    sets = [arg for value in (reward, *overrides) for arg in ("--set", value)]
    result = runner.invoke(app, ["train", "--recipe", recipe, "--num-rollout", "2", "--output-dir", str(out), *sets])
    assert result.exit_code == 0, result.output
    return [r for r in read_metrics(out / "metrics.jsonl") if "train/train_rollout_kl" in r]


def test_int4_qat_with_int4_rollout_is_bitwise_on_policy(tmp_path, reward):
    steps = run(tmp_path, reward, "tiny-moe-int4-qat")
    assert len(steps) == 2
    for record in steps:  # the recipe's true_on_policy would also have stopped the run otherwise
        assert record["train/train_rollout_logprob_bitwise_equal"] == 1.0
        assert record["train/train_rollout_kl"] == 0.0 and record["train/grad_norm"] > 0


def test_int4_rollout_without_qat_has_a_gap(tmp_path, reward):
    steps = run(tmp_path, reward, "tiny-moe-int4-qat", 'train.qat="off"', "alignment.true_on_policy=false")
    assert all(r["train/train_rollout_logprob_bitwise_equal"] == 0.0 and r["train/train_rollout_kl"] > 0 for r in steps)


def test_fp8_rollout_recipe_trains(tmp_path, reward):
    steps = run(tmp_path, reward, "tiny-moe-fp8")
    assert len(steps) == 2
    assert all(r["train/train_rollout_kl"] > 0 and r["train/grad_norm"] > 0 for r in steps)
    assert all(r["train/train_rollout_logprob_abs_diff"] < 0.05 for r in steps)


def test_qwen3_moe_fp8_needs_a_checkpoint_and_gpus(tmp_path):
    result = runner.invoke(app, ["train", "--recipe", "qwen3-moe-fp8", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "pass --hf-checkpoint DIR" in " ".join(result.output.split())
    result = runner.invoke(app, ["train", "--recipe", "qwen3-moe-fp8", "--output-dir", str(tmp_path / "run"),
                                 "--hf-checkpoint", "tiny-qwen3-moe"])
    if not __import__("torch").cuda.is_available():
        assert result.exit_code == 2 and "CUDA is not available" in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("colocate", ["false", "true"])
def test_int4_qat_with_engine_holding_int4_weights_is_bitwise_on_policy(tmp_path, reward, colocate):
    # The engine holds the packed INT4 experts (engine.weights = "quantized") of a checkpoint made by
    # `miles quantize --only experts`; the sync hands it the trainer's quantised tensors as they are.
    # Colocated, the engine drops every weight at each release: the sync must write all of them.
    source = tmp_path / "int4"
    result = runner.invoke(app, ["quantize", "tiny-qwen3-moe", str(source), "--format", "int4", "--group-size", "32",
                                 "--only", "*.mlp.experts.*"])
    assert result.exit_code == 0, result.output
    steps = run(tmp_path, reward, "tiny-moe-int4-qat", f'model.source="{source}"', 'engine.weights="quantized"',
                f"engine.colocate={colocate}")
    assert len(steps) == 2
    for record in steps:
        assert record["train/train_rollout_logprob_bitwise_equal"] == 1.0
        assert record["train/train_rollout_kl"] == 0.0 and record["train/grad_norm"] > 0


def test_fp8_training_gemms_train_end_to_end(tmp_path, reward):
    # train.precision = fp8 against a full-precision engine: the weights move, with a small gap.
    steps = run(tmp_path, reward, "tiny-moe", 'train.precision="fp8"')
    assert len(steps) == 2 and all(r["train/grad_norm"] > 0 for r in steps)
    assert all(0 < r["train/train_rollout_kl"] < 0.05 for r in steps)


def test_fp8_training_with_fp8_rollout_trains(tmp_path, reward):
    """All three GEMMs of every policy Linear in FP8 (forward and both gradients) still train."""
    steps = run(tmp_path, reward, "tiny-moe-fp8", 'train.precision="fp8"')
    assert len(steps) == 2
    assert all(r["train/grad_norm"] > 0 and 0 < r["train/train_rollout_kl"] < 1e-3 for r in steps)
    assert all(r["train/train_rollout_logprob_abs_diff"] < 0.05 for r in steps)
