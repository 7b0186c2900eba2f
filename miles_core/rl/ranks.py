"""`miles train --nproc-per-node N`: one run on N trainer ranks of this machine.

Rank 0 runs the whole loop (`loop.run_training`): the rollout engine, the rollout manager,
metrics, checkpoints and the weight sync are its own. Ranks 1..N-1 only build the trainer from
the same config and follow rank 0's trainer calls (`train/leader.py`); all ranks train. Needs a
data-parallel trainer (`train.backend = "fsdp"`).
"""

from __future__ import annotations

from pathlib import Path

from miles_core.checkpoint.loading import load_model
from miles_core.config import MilesConfig
from miles_core.errors import MilesError, RunStopped
from miles_core.launch.local import run_ranks
from miles_core.rl import loop
from miles_core.rl.loop import RunResult
from miles_core.rl.run import build_run_trainer
from miles_core.train.leader import follow, release_followers


def run_training_ranks(cfg: MilesConfig, output_dir: Path, num_ranks: int, **kwargs) -> RunResult:
    """`run_training` with `num_ranks` trainer ranks (1: this process alone, as always)."""
    if num_ranks < 1:
        raise MilesError(f"--nproc-per-node must be >= 1, got {num_ranks}")
    if num_ranks == 1:
        return loop.run_training(cfg, output_dir, **kwargs)
    if cfg.train.backend != "fsdp":
        raise MilesError(f"--nproc-per-node {num_ranks} needs a data-parallel trainer: set train.backend = 'fsdp' "
                         f"(got '{cfg.train.backend}')")
    if kwargs.get("mode") == "rollout_only":
        raise MilesError("--debug-rollout-only trains nothing: run it without --nproc-per-node")

    def leader() -> RunResult:
        try:
            result = loop.run_training(cfg, output_dir, **kwargs)
        except RunStopped:  # between steps (Ctrl-C, after the save): the followers are idle
            release_followers()
            raise
        release_followers()
        return result

    return run_ranks(num_ranks, leader, follow_rank_zero, (cfg,))


def follow_rank_zero(cfg: MilesConfig) -> None:
    """A rank other than 0: build the trainer as rank 0 does, then run the calls it sends."""
    loaded = load_model(cfg.model, alignment_mode=cfg.alignment.mode)
    trainer = build_run_trainer(cfg, loaded)
    follow(trainer, trainer.control_group)
