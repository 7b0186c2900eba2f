"""`train.backend = "fsdp"` on CUDA: the same numbers as the native trainer on the same GPU.

One rank without a launcher (the trainer starts its own group), in fp32 and in bf16 compute;
as many NCCL ranks as the machine has GPUs (two or more) against one process; and the CLI end to
end with `--nproc-per-node`, the engine in rank 0's process or on every GPU (`engine.ranks`). The CPU twins of these tests (gloo) are `test_fsdp.py` and
`tests/e2e/test_e2e_nproc.py`.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.checkpoint.loading import load_model
from miles_core.config import ModelConfig, TrainConfig
from miles_core.launch.local import run_ranks
from miles_core.metrics import read_metrics
from miles_core.train import build_trainer
from miles_core.train.leader import follow, release_followers
from tests.train.test_fsdp import ALGO, TRAIN, native_options
from tests.train.test_trainer_math import _grpo_batch

pytestmark = pytest.mark.gpu
KEYS = ("loss", "grad_norm", "pg_loss", "kl_loss", "entropy_loss")


def _model():
    return load_model(ModelConfig(source="tiny-qwen3", device="cuda")).model


def _train(cfg: TrainConfig) -> tuple[dict, dict]:
    trainer = build_trainer(cfg, ALGO, _model(), temperature=1.0, total_steps=4)
    metrics = trainer.train_rollout(_grpo_batch())
    return metrics, {name: tensor.detach().float().cpu() for name, tensor in trainer.export_weights()}


# fp32: the same kernels on the same data, only the gradient's path through FSDP differs.
# bf16: both cast the fp32 masters to bf16 for each forward; FSDP casts the gradients to fp32
# before its reduction, the native path in autograd's cast: the same values.
# `step`: FSDP accumulates the unsharded bf16 gradients in fp32, as the native path folds them.
# Checkpointed layers: the recomputation in backward runs on the weights gathered again.
@pytest.mark.parametrize("options, rel", [
    (dict(compute_dtype="float32"), 1e-5), (dict(compute_dtype="bfloat16"), 1e-3),
    (dict(compute_dtype="bfloat16", fsdp_reshard="step"), 1e-3),
    (dict(compute_dtype="bfloat16", pack_sequences=True, activation_checkpointing=True), 1e-3),
])
def test_one_rank_on_cuda_matches_native(tmp_path, monkeypatch, options, rel):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    expected, expected_weights = _train(TrainConfig(**native_options(options), **TRAIN))
    try:
        got, weights = _train(TrainConfig(backend="fsdp", **options, **TRAIN))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], rel=rel, abs=1e-7), (key, got[key], expected[key])
    assert expected["grad_norm"] > 0.1
    for name, tensor in expected_weights.items():  # AdamW at lr 1e-3: rounding moves a weight by ~1e-6
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-5 if rel < 1e-4 else 1e-4)


def _leader() -> dict:
    metrics, weights = _train(TrainConfig(backend="fsdp", **TRAIN))
    release_followers()
    return {"metrics": metrics, "weights": weights}


def _follower() -> None:
    trainer = build_trainer(TrainConfig(backend="fsdp", **TRAIN), ALGO, _model(), temperature=1.0, total_steps=4)
    follow(trainer, trainer.control_group)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_every_gpu_a_rank_matches_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    expected, expected_weights = _train(TrainConfig(**TRAIN))
    out = run_ranks(torch.cuda.device_count(), _leader, _follower, ())
    for key in KEYS:
        assert out["metrics"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(out["weights"][name], tensor, rtol=1e-5, atol=1e-5)


def _cli(out, *extra) -> list[dict]:
    args = ["train", "--recipe", "tiny", "--set", "model.device=cuda", "--set", "algo.entropy_coef=0.01",
            "--output-dir", str(out), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.parametrize("colocate", [False, True])
def test_cli_fsdp_ranks_on_cuda_give_the_one_process_metrics(tmp_path, monkeypatch, colocate):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    ranks = str(min(torch.cuda.device_count(), 2))
    extra = ["--set", f"engine.colocate={str(colocate).lower()}"]
    one = _cli(tmp_path / "one", *extra)
    fsdp = _cli(tmp_path / "fsdp", "--nproc-per-node", ranks, "--set", "train.backend=fsdp", *extra)
    assert sum("train/loss" in m for m in one) == 2
    for a, b in zip(one, fsdp, strict=True):
        assert b.get("rollout/raw_reward") == a.get("rollout/raw_reward")  # same rollouts: same weights synced
        for key in ("train/loss", "train/grad_norm", "train/pg_loss", "train/entropy_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, b[key], a[key])
    trainer = tmp_path / "fsdp" / "checkpoints" / "step_000002" / "trainer"
    assert (trainer / "dcp" / ".metadata").is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("colocate", [False, True])
def test_cli_an_engine_on_every_gpu_gives_the_one_process_metrics(tmp_path, monkeypatch, colocate):
    """`engine.ranks = "all"`: each GPU's engine generates half of every rollout on the weights its
    rank's FSDP gathers wrote. Invariant kernels: a request's tokens do not depend on its batch."""
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    extra = ["--set", "alignment.mode=invariant", "--set", f"engine.colocate={str(colocate).lower()}"]
    one = _cli(tmp_path / "one", *extra)
    every = _cli(tmp_path / "every", "--nproc-per-node", "2", "--set", "train.backend=fsdp", "--set", "engine.ranks=all",
                 *extra)
    assert sum("train/loss" in m for m in one) == 2
    for a, b in zip(one, every, strict=True):
        assert b.get("rollout/raw_reward") == a.get("rollout/raw_reward")
        for key in ("train/loss", "train/grad_norm", "train/pg_loss", "train/entropy_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, b[key], a[key])
