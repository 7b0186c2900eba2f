"""The GRPO loop with an engine that fused its projections, as the native engine does on CUDA:
every weight trains, the engine's weights equal the trainer's bitwise after every sync, and the
trainer's log-probs stay those of the weights the engine generated with. The trainer's model is a
copy of the engine's; that copy once read a stale fused q/k/v and gate/up weight, so on GPUs none
of those weights trained and bf16 compute failed (fp32 fused weight, bf16 input). On CPU the
fusion is forced (the engine fuses only on CUDA, so CPU CI could not see it); on a GPU it is the
default, for both trainers.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from miles_core.checkpoint.sources import resolve_model_source
from miles_core.config import load_config
from miles_core.metrics import read_metrics
from miles_core.rl.loop import run_training

SYNC_CHECKED = ["sync.check_weight_update_equal=true"]  # the engine's weights, bitwise, after each sync


def _unchanged_weights(run_dir, overrides: list[str], steps: int) -> list[str]:
    """Runs the tiny recipe; the names of the weights the saved checkpoint still holds as they started."""
    run_training(load_config("tiny", [*overrides, f"loop.num_rollout={steps}", "eval.datasets=[]", *SYNC_CHECKED]),
                 run_dir)
    start = load_file(resolve_model_source("tiny-qwen3") / "model.safetensors")
    trained = load_file(run_dir / "checkpoints" / f"step_{steps:06d}" / "model.safetensors")
    assert trained.keys() == start.keys()
    return [name for name, tensor in start.items() if torch.equal(trained[name], tensor)]


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_a_fused_engine_leaves_the_trainer_training_every_weight(tmp_path, monkeypatch, compute_dtype):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("miles_core.engine.native.engine.fuses_on", lambda model: True)
    overrides = [f"train.compute_dtype={compute_dtype}", "train.lr=1e-3", "algo.entropy_coef=0.01"]
    assert _unchanged_weights(tmp_path / "run", overrides, steps=3) == []
    # The trainer's first forward of each step against the engine's sampling log-probs: the same
    # weights, so only rounding apart (measured 4.8e-7 in fp32, 2-3e-3 for a bf16 trainer).
    diffs = [m["train/train_rollout_logprob_max_abs_diff"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert max(diffs) < (1e-5 if compute_dtype == "float32" else 1e-2), diffs  # bf16 trainer, fp32 engine


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "fsdp"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_every_weight_trains_with_the_engine_in_the_process_on_cuda(tmp_path, monkeypatch, backend, compute_dtype):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    overrides = ["model.device=cuda", f"train.backend={backend}", f"train.compute_dtype={compute_dtype}",
                 "algo.entropy_coef=0.01"]
    assert _unchanged_weights(tmp_path / "run", overrides, steps=2) == []
    assert not dist.is_initialized()  # the FSDP trainer's own NCCL group is gone with the run
