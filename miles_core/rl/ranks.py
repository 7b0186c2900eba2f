"""`miles train --nproc-per-node N`: one run on N trainer ranks of this machine.

Rank 0 runs the whole loop (`loop.run_training`): the rollout engine, the rollout manager,
metrics, checkpoints and the weight sync are its own. Ranks 1..N-1 only build the trainer from
the same config and follow rank 0's trainer calls (`train/leader.py`); all ranks train. With
`engine.ranks = "all"` each of them builds an engine too and generates its share of every
rollout for rank 0 (`rl/rank_engines.py`). Needs a multi-rank trainer: `train.backend = "fsdp"`
(data parallel) or `"megatron"` (one rank per tensor- or expert-parallel shard, times the
data-parallel replicas). The ranks are local processes (`launch/local.py`) or, with
`--ray`, Ray actors (`launch/ray_launch.py`), whose launched rollout servers are Ray actors too
(`engine/ray_servers.py`); the code each rank runs is the same.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from miles_core.checkpoint.loading import load_model
from miles_core.config import MilesConfig
from miles_core.engine import build_engine, close_engine
from miles_core.engine.ray_servers import num_servers
from miles_core.errors import MilesError, RunStopped
from miles_core.launch.local import run_ranks
from miles_core.rl import loop
from miles_core.rl.loop import RunResult
from miles_core.rl.rank_engines import EngineFollower
from miles_core.rl.run import build_run_trainer
from miles_core.train.leader import follow, release_followers


def run_training_ranks(cfg: MilesConfig, output_dir: Path, num_ranks: int, *, use_ray: bool = False,
                       **kwargs) -> RunResult:
    """`run_training` with `num_ranks` trainer ranks (1 without Ray: this process alone, as always);
    `use_ray`: every rank a Ray actor (`launch/ray_launch.py`), else local processes."""
    if num_ranks < 1:
        raise MilesError(f"--nproc-per-node must be >= 1, got {num_ranks}")
    if cfg.train.backend == "megatron" and kwargs.get("mode") != "rollout_only":
        from miles_core.train.megatron import parallel_sizes
        from miles_core.train.megatron_env import check_sizes

        check_sizes(parallel_sizes(cfg.train), num_ranks)  # before any rank starts
    if num_ranks == 1 and not use_ray:
        return loop.run_training(cfg, output_dir, **kwargs)
    if num_ranks > 1 and cfg.train.backend not in ("fsdp", "megatron"):
        raise MilesError(f"--nproc-per-node {num_ranks} needs a multi-rank trainer: set train.backend = 'fsdp' "
                         f"(data parallel) or 'megatron' (tensor parallel), got '{cfg.train.backend}'")
    if num_ranks > 1 and kwargs.get("mode") == "rollout_only":
        raise MilesError("--debug-rollout-only trains nothing: run it without --nproc-per-node")
    if use_ray:
        from miles_core.launch.ray_launch import run_ray_ranks

        on_step, should_stop = kwargs.pop("on_step", None), kwargs.pop("should_stop", lambda: False)
        return run_ray_ranks(num_ranks, partial(lead_run, cfg, output_dir, **kwargs), follow_rank_zero, (cfg,),
                             on_step=on_step, should_stop=should_stop,
                             num_servers=num_servers(cfg.engine) if cfg.engine.launch else 0,
                             colocated=cfg.engine.colocate and cfg.engine.launch)
    return run_ranks(num_ranks, partial(lead_run, cfg, output_dir, **kwargs), follow_rank_zero, (cfg,))


def lead_run(cfg: MilesConfig, output_dir: Path, **kwargs) -> RunResult:
    """Rank 0 of several: the whole run, then the other ranks released from `follow`."""
    try:
        result = loop.run_training(cfg, output_dir, **kwargs)
    except RunStopped:  # between steps (Ctrl-C, after the save): the followers are idle
        release_followers()
        raise
    release_followers()
    return result


def follow_rank_zero(cfg: MilesConfig) -> None:
    """A rank other than 0: build the trainer (and with `engine.ranks = "all"` the engine) as rank
    0 does, then run the calls it sends."""
    loaded = load_model(cfg.model, alignment_mode=cfg.alignment.mode)
    engine = build_engine(cfg.engine, loaded) if cfg.engine.ranks == "all" else None
    try:
        trainer = build_run_trainer(cfg, loaded)
        follower = EngineFollower(engine, cfg.sync, trainer.control_group) if engine is not None else None
        follow(trainer, trainer.control_group, follower)
    finally:
        close_engine(engine)
