"""Rank 0 leads the other trainer ranks: the GRPO loop runs on rank 0 only (it owns the rollout
engine, the rollout manager, metrics and outputs), and every trainer call it makes is first
broadcast to the other ranks, which run the same call (`follow`), so the collectives inside
(FSDP all-gathers, reduce-scatters, DCP saves) meet. Calls travel as pickled objects over a gloo
group of their own, so a GPU run's NCCL group only carries tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from miles_core.train.batch import TrainBatch
from miles_core.train.protocol import TrainBackend

_STOP = "stop"


class LeaderTrainer:
    """`TrainBackend` on rank 0 of several: each collective call is sent to the followers first."""

    current: LeaderTrainer | None = None
    """The leader of this process's run, released by `release_followers` when the run is over."""

    def __init__(self, trainer: TrainBackend, group) -> None:
        self.trainer, self.group = trainer, group
        LeaderTrainer.current = self

    def _call(self, name: str, *args, **kwargs):
        dist.broadcast_object_list([(name, args, kwargs)], src=0, group=self.group)
        return getattr(self.trainer, name)(*args, **kwargs)

    def compute_log_probs(self, batch: TrainBatch, *, reference: bool = False) -> list[torch.Tensor]:
        return self._call("compute_log_probs", batch, reference=reference)

    def compute_values(self, batch: TrainBatch) -> list[torch.Tensor]:
        return self._call("compute_values", batch)

    def train_rollout(self, batch: TrainBatch) -> dict[str, float]:
        return self._call("train_rollout", batch)

    def update_reference(self) -> None:
        self._call("update_reference")

    def offload_optimizer(self) -> int:
        return self._call("offload_optimizer")

    def reload_optimizer(self) -> None:
        self._call("reload_optimizer")

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors; the caller must consume all of them (the followers gather with it)."""
        return self._call("export_weights")

    def save(self, directory: Path) -> None:
        self._call("save", directory)

    def load(self, directory: Path) -> None:
        self._call("load", directory)

    def last_pass_metrics(self) -> dict[str, float]:
        return self.trainer.last_pass_metrics()

    def skipped_notes(self) -> list[str]:
        return self.trainer.skipped_notes()

    def release(self) -> None:
        """Let the followers return from `follow` (the run is over)."""
        dist.broadcast_object_list([(_STOP, (), {})], src=0, group=self.group)
        LeaderTrainer.current = None


def release_followers() -> None:
    """End the followers' `follow` loops after a run that finished (no-op without a leader)."""
    if LeaderTrainer.current is not None:
        LeaderTrainer.current.release()


def follow(trainer: TrainBackend, group, engine=None) -> None:
    """Run rank 0's trainer calls on this rank until it releases the followers; with `engine`
    (`rl/rank_engines.EngineFollower`, `engine.ranks = "all"`) its engine calls too, and the
    exported weights go into this rank's engine."""
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=group)
        name, args, kwargs = message[0]
        if name == _STOP:
            return
        if engine is not None and engine.handle(name, args):
            continue
        result = getattr(trainer, name)(*args, **kwargs)
        if name == "export_weights":
            if engine is not None:
                engine.take_weights(result)
            else:
                for _ in result:  # the gathers happen as the tensors are drawn
                    pass


def lead(trainer) -> TrainBackend:
    """The trainer rank 0 hands the loop: a `LeaderTrainer` when there are other ranks."""
    if dist.get_world_size() == 1 or dist.get_rank() != 0:
        return trainer
    return LeaderTrainer(trainer, trainer.control_group)
