"""`miles train --nproc-per-node 2 --set train.backend=fsdp` end to end on CPU (gloo): the same
train metrics as one process (relative 1e-5), colocated or not, a sharded checkpoint, no rank left
running; and the clear errors of a launch that cannot work."""

from __future__ import annotations

import multiprocessing

import pytest
import torch.distributed as dist
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.metrics import read_metrics

runner = CliRunner()


def _ranks_alive() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("miles-rank")]
# The random tiny model never earns a reward, so an entropy bonus gives the update a gradient.
COMMON = ["train", "--recipe", "tiny", "--set", "algo.entropy_coef=0.01"]


def _run(out, *extra):
    result = runner.invoke(app, [*COMMON, "--output-dir", str(out), *extra])
    assert result.exit_code == 0, result.output
    return read_metrics(out / "metrics.jsonl")


# `engine.ranks = "all"`: rank 1's engine generates half of every rollout on the weights its FSDP
# gathers wrote; colocated, each engine drops its weights at every release, so each must have been
# rewritten whole before it could generate again.
@pytest.mark.parametrize("engines", [[], ["--set", "engine.ranks=all"]], ids=["engine-on-rank-0", "engine-on-every-rank"])
def test_two_ranks_give_the_one_process_metrics(tmp_path, monkeypatch, engines):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    one = _run(tmp_path / "one")
    ranks = ["--nproc-per-node", "2", "--set", "train.backend=fsdp", *engines]
    two = _run(tmp_path / "two", *ranks)
    # colocated: the engine in rank 0's process drops its weights at each release, the sync of the
    # gathered FSDP weights writes them all again
    colocated = _run(tmp_path / "colocated", *ranks, "--set", "engine.colocate=true")
    assert not _ranks_alive()
    trained = [m for m in one if "train/loss" in m]
    assert len(trained) == 2 and all(m["train/grad_norm"] > 0 for m in trained)
    for a, b, c in zip(one, two, colocated, strict=True):
        for key in ("train/loss", "train/grad_norm", "train/pg_loss", "train/entropy_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), key
                assert c[key] == b[key], key
        assert b.get("rollout/raw_reward") == a.get("rollout/raw_reward") == c.get("rollout/raw_reward")
        assert ("perf/engine_kv_released_gb" in c) == ("train/loss" in c)  # released before each update
    trainer = tmp_path / "two" / "checkpoints" / "step_000002" / "trainer"
    assert (trainer / "dcp" / ".metadata").is_file() and (trainer / "trainer_state.pt").is_file()


def test_one_fsdp_rank_in_this_process_leaves_no_group_behind(tmp_path, monkeypatch):
    # The trainer starts its own one-rank group; a live one outlived the run (on a GPU, its NCCL
    # watchdog then broke the CUDA graph captures of whatever ran next in the process).
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    one, fsdp = _run(tmp_path / "one"), _run(tmp_path / "fsdp", "--set", "train.backend=fsdp")
    assert not dist.is_initialized()
    losses = [[m["train/loss"] for m in run if "train/loss" in m] for run in (one, fsdp)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_several_ranks_need_a_multi_rank_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, [*COMMON, "--output-dir", str(tmp_path / "x"), "--nproc-per-node", "2"])
    assert result.exit_code != 0
    assert ("--nproc-per-node 2 needs a multi-rank trainer: set train.backend = 'fsdp' (data parallel) or 'megatron' "
            "(tensor parallel), got 'native'") in " ".join(result.output.split())  # rich wraps long lines
