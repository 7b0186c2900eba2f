"""The GRPO loop on a GPU with the embedded engine trains every weight.

On CUDA the engine fuses its model's q/k/v and gate/up projections (`engine/native/fuse.py`)
before the trainer copies the loaded model; the trainer once read a stale copy of those fused
weights, so none of them trained (and bf16 compute failed on the fp32 copy). Here every weight
of the saved checkpoint differs from the starting one, for both trainers, in fp32 and bf16, and
the engine's weights equal the trainer's bitwise after every sync.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from miles_core.checkpoint.sources import resolve_model_source
from miles_core.config import load_config
from miles_core.rl.loop import run_training

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["native", "fsdp"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_every_weight_trains_with_the_engine_in_the_process(tmp_path, monkeypatch, backend, compute_dtype):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    overrides = ["model.device=cuda", f"train.backend={backend}", f"train.compute_dtype={compute_dtype}",
                 "algo.entropy_coef=0.01", "loop.num_rollout=2", "eval.datasets=[]",
                 "sync.check_weight_update_equal=true"]  # the engine's weights, bitwise, after each sync
    run_training(load_config("tiny", overrides), tmp_path / "run")
    assert not dist.is_initialized()  # the FSDP trainer's own NCCL group is gone with the run
    start = load_file(resolve_model_source("tiny-qwen3") / "model.safetensors")
    trained = load_file(tmp_path / "run" / "checkpoints" / "step_000002" / "model.safetensors")
    assert trained.keys() == start.keys()
    unchanged = [name for name, tensor in start.items() if torch.equal(trained[name], tensor)]
    assert unchanged == []
