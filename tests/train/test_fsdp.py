"""`train.backend = "fsdp"`: data parallelism changes no math. Two gloo ranks on CPU train the
same batch as the one-process native trainer: same loss and gradient norm (relative 1e-5), same
weights after the step (to rounding); sharded DCP checkpoints resume bitwise; the ranks are
launched and shut down cleanly (`launch/local.py`)."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.distributed as dist

from miles_core.config import AlgoConfig, ModelConfig, TrainConfig
from miles_core.checkpoint.loading import load_model
from miles_core.errors import MilesError
from miles_core.launch.local import run_ranks
from miles_core.train import build_trainer
from miles_core.train.leader import follow, release_followers
from miles_core.train.parallelize import split_by_tokens
from tests.train.test_trainer_math import _grpo_batch

# KL loss (a reference model, a no-grad pass), two optimizer steps per rollout (old log-probs),
# entropy bonus, and a budget that makes the two ranks' micro-batch counts differ.
def _ranks_alive() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("miles-rank")]


ALGO = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01)
TRAIN = dict(lr=1e-3, max_tokens_per_micro_batch=24, num_steps_per_rollout=2)


def test_split_by_tokens_balances_prompt_groups_or_samples():
    batch = _grpo_batch()
    # shared prompts: group costs 5 + (1+2+3) = 11, 9 + (4+5+1) = 19, 3 + (2+3+4) = 12; longest first:
    # 19 -> rank 0, 12 -> rank 1, 11 -> rank 1 (12 < 19)
    assert split_by_tokens(batch.tokens, batch.response_lengths, 2, True) == [[3, 4, 5], [0, 1, 2, 6, 7, 8]]
    # samples of 6 7 8 13 14 10 5 6 7 tokens: 14 r0, 13 r1, 10 r1 (23), 8 r0 (22), 7 r0 (29), 7 r1 (30),
    # 6 r0 (35), 6 r1 (36), 5 r0 (40)
    assert split_by_tokens(batch.tokens, batch.response_lengths, 2, False) == [[0, 1, 2, 4, 6], [3, 5, 7, 8]]
    assert split_by_tokens(batch.tokens[:1], batch.response_lengths[:1], 2, False) == [[0], []]


def _model():
    return load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model


def _train(trainer, share: bool):
    batch = _grpo_batch()
    return trainer.train_rollout(batch), {n: t.clone() for n, t in trainer.export_weights()}


def _leader(share: bool, folder: str, options: dict) -> dict:
    """Rank 0: one rollout, a save, a second rollout; then a fresh trainer loads the save and
    trains the second rollout again."""
    cfg = TrainConfig(backend="fsdp", share_prompt_prefix=share, **options, **TRAIN)
    trainer = build_trainer(cfg, ALGO, _model(), temperature=1.0, total_steps=4)
    first, weights = _train(trainer, share)
    trainer.save(_path(folder))
    second, _ = _train(trainer, share)
    release_followers()
    fresh = build_trainer(cfg, ALGO, _model(), temperature=1.0, total_steps=4)
    fresh.load(_path(folder))
    again, _ = _train(fresh, share)
    release_followers()
    return {"first": first, "weights": weights, "second": second, "again": again}


def _follower(share: bool, folder: str, options: dict) -> None:
    cfg = TrainConfig(backend="fsdp", share_prompt_prefix=share, **options, **TRAIN)
    for _ in range(2):
        trainer = build_trainer(cfg, ALGO, _model(), temperature=1.0, total_steps=4)
        follow(trainer, trainer.control_group)


def _path(folder: str):
    from pathlib import Path
    return Path(folder) / "trainer"


# `step`: gradients accumulated unsharded over the micro-batches and reduced once, the same sums;
# with checkpointed layers on packed rows against the native trainer with the same options.
SPEED = dict(fsdp_reshard="step", pack_sequences=True, activation_checkpointing=True)


def native_options(options: dict) -> dict:
    """`options` without the FSDP-only ones: the native trainer to compare with."""
    return {key: value for key, value in options.items() if key != "fsdp_reshard"}


@pytest.mark.parametrize("share, options", [(True, {}), (False, {}), (True, SPEED)])
def test_two_ranks_match_one_process(tmp_path, monkeypatch, share, options):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    native = build_trainer(TrainConfig(share_prompt_prefix=share, **native_options(options), **TRAIN), ALGO, _model(),
                           temperature=1.0, total_steps=4)
    expected, expected_weights = _train(native, share)
    out = run_ranks(2, lambda: _leader(share, str(tmp_path), options), _follower, (share, str(tmp_path), options))
    assert not dist.is_initialized()
    for key in ("loss", "grad_norm", "pg_loss", "kl_loss", "entropy_loss"):
        assert out["first"][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    assert expected["grad_norm"] > 0.1 and abs(expected["kl_loss"]) > 0  # the check has something to compare
    assert out["weights"].keys() == expected_weights.keys()
    # AdamW divides by the root of the second moment: where a gradient is tiny, rounding moves the
    # update by up to a few 1e-6 (lr 1e-3); no weight moves by more than that.
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(out["weights"][name], tensor, rtol=1e-5, atol=1e-5)
    assert out["again"] == out["second"]  # resumed from the sharded checkpoint: bitwise


# bf16: both cast the fp32 masters for each forward, the reference model's too (the KL term).
# Checkpointed layers on packed rows: the same kernels on the same data as the native trainer with
# the same options, so the same numbers to the bit.
@pytest.mark.parametrize("options, rel", [
    (dict(compute_dtype="float32"), 1e-5), (dict(compute_dtype="bfloat16"), 1e-3),
    (dict(pack_sequences=True, activation_checkpointing=True), 0.0),
    (dict(pack_sequences=True, activation_checkpointing=True, fsdp_reshard="step"), 0.0),
])
def test_one_rank_without_a_launcher_matches_native(tmp_path, monkeypatch, options, rel):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    native = build_trainer(TrainConfig(**native_options(options), **TRAIN), ALGO, _model(), temperature=1.0, total_steps=4)
    fsdp = build_trainer(TrainConfig(backend="fsdp", **options, **TRAIN), ALGO, _model(), temperature=1.0,
                         total_steps=4)
    try:
        (expected, _), (got, _) = _train(native, True), _train(fsdp, True)
    finally:
        dist.destroy_process_group()
    for key in ("loss", "grad_norm", "kl_loss"):
        assert got[key] == pytest.approx(expected[key], rel=rel), (key, got[key], expected[key])


def test_step_reshard_keeps_the_parameters_gathered_until_the_last_backward(tmp_path, monkeypatch):
    """`train.fsdp_reshard = "step"`: after a step's first micro-batch the layers' parameters are
    still gathered (plain tensors, not DTensor shards), after the step every one is a shard again;
    the step's metrics are those of FSDP's per-micro-batch resharding."""
    from torch.distributed.tensor import DTensor

    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    got = {}
    try:
        for reshard in ("micro_batch", "step"):
            trainer = build_trainer(TrainConfig(backend="fsdp", fsdp_reshard=reshard, **TRAIN), ALGO, _model(),
                                    temperature=1.0, total_steps=4)
            sharded, micro_step = [], trainer._micro_step

            def counted(*args, trainer=trainer, micro_step=micro_step, sharded=sharded):
                out = micro_step(*args)
                sharded.append(isinstance(trainer.model.model.layers[0].mlp.up_proj.weight, DTensor))
                return out

            monkeypatch.setattr(trainer, "_micro_step", counted)
            got[reshard] = (trainer.train_rollout(_grpo_batch()), sharded,
                            all(isinstance(p, DTensor) for p in trainer.model.parameters()))
    finally:
        dist.destroy_process_group()
    (metrics, sharded, after), (step_metrics, step_sharded, step_after) = got["micro_batch"], got["step"]
    assert len(sharded) == len(step_sharded) >= 4  # two optimizer steps of two or more micro-batches
    assert all(sharded) and after and step_after
    assert not all(step_sharded) and step_sharded[-1]  # gathered within the step, shards after its last
    for key in ("loss", "grad_norm", "kl_loss"):
        assert step_metrics[key] == pytest.approx(metrics[key], rel=1e-6), key


def test_unsupported_options_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    for options, what in [(dict(qat="int4"), "train.qat = 'int4'"), (dict(compile=True), "train.compile")]:
        with pytest.raises(MilesError, match=f"fsdp' does not support {what} yet"):
            build_trainer(TrainConfig(backend="fsdp", **options), AlgoConfig(), _model(), temperature=1.0,
                          total_steps=1)


def _failing_worker() -> None:
    raise RuntimeError("rank 1 broke")


def _waiting_leader() -> None:
    dist.barrier()  # rank 1 never comes: its process died


def _raising_leader() -> None:
    raise MilesError("rank 0 broke")


def _blocked_worker() -> None:
    dist.barrier()  # rank 0 never comes


def test_a_failed_rank_stops_the_run_and_leaves_no_process():
    with pytest.raises(MilesError, match="rank 1 exit code 1"):
        run_ranks(2, _waiting_leader, _failing_worker, ())
    assert not _ranks_alive() and not dist.is_initialized()
    with pytest.raises(MilesError, match="rank 0 broke"):
        run_ranks(2, _raising_leader, _blocked_worker, ())
    assert not _ranks_alive() and not dist.is_initialized()
