"""The GRPO loop with an engine that fused its projections, as the native engine does on CUDA
(forced here on CPU): every weight trains and the trainer's log-probs stay those of the weights
the engine generated with. The trainer's model is a copy of the engine's; that copy once read a
stale fused q/k/v and gate/up weight, so on GPUs none of those weights trained (CPU CI could not
see it: the engine fuses only on CUDA)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from miles_core.checkpoint.sources import resolve_model_source
from miles_core.config import load_config
from miles_core.metrics import read_metrics
from miles_core.rl.loop import run_training


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_a_fused_engine_leaves_the_trainer_training_every_weight(tmp_path, monkeypatch, compute_dtype):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("miles_core.engine.native.engine.fuses_on", lambda model: True)
    overrides = [f"train.compute_dtype={compute_dtype}", "train.lr=1e-3", "algo.entropy_coef=0.01",
                 "loop.num_rollout=3", "eval.datasets=[]", "sync.check_weight_update_equal=true"]
    run_training(load_config("tiny", overrides), tmp_path / "run")
    start = load_file(resolve_model_source("tiny-qwen3") / "model.safetensors")
    trained = load_file(tmp_path / "run" / "checkpoints" / "step_000003" / "model.safetensors")
    assert [name for name, tensor in start.items() if torch.equal(trained[name], tensor)] == []
    # The trainer's first forward of each step against the engine's sampling log-probs: the same
    # weights, so only rounding apart (measured 4.8e-7 in fp32, 2-3e-3 for a bf16 trainer).
    diffs = [m["train/train_rollout_logprob_max_abs_diff"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert max(diffs) < (1e-5 if compute_dtype == "float32" else 1e-2), diffs  # bf16 trainer, fp32 engine
