"""`engine.ranks = "all"`: an in-process native engine in every trainer rank's process, on its GPU.

With `--nproc-per-node N` the loop runs on rank 0, whose engine alone would generate while the
other ranks wait; here each rank generates a share. `RankEngines` stands for all of them on rank
0: a `generate` call is split into N contiguous shares of the requests, sent to the other ranks
over the trainer's control channel (`train/leader.py`: calls travel in order, as trainer calls
do), answered by each rank's engine (`EngineFollower`) and gathered back in order. Every other
engine call (the weight sync's pause, update and flush, the eval's length checks) is rank 0's
engine alone: no message may travel while a sync runs, since the other ranks are then inside the
FSDP gathers of the same weights. Instead each of them writes what its gathers produce into its
own engine (`EngineFollower.take_weights`): the full weights, with no transfer beyond FSDP's. The
weight version each rank's engine reports is rank 0's, stamped with every `generate` call.
Colocated (`engine.colocate`), a release or resume of rank 0's engine is sent to every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from miles_core.config import MilesConfig, SyncConfig
from miles_core.engine.protocol import GenerateRequest, Generation, RolloutEngine
from miles_core.sync.inprocess import InProcessSync
from miles_core.train.leader import LeaderTrainer
from miles_core.train.protocol import TrainBackend

PREFIX = "engine."
"""Marks a control-channel call for the followers' engines, not their trainers."""


def shares(requests: Sequence, num_ranks: int) -> list[list]:
    """`requests` cut into `num_ranks` contiguous shares whose sizes differ by at most one."""
    count = len(requests)
    return [list(requests[rank * count // num_ranks:(rank + 1) * count // num_ranks]) for rank in range(num_ranks)]


def engine_of_ranks(cfg: MilesConfig, engine: RolloutEngine, trainer: TrainBackend | None) -> RolloutEngine:
    """Rank 0's engine, standing for every rank's with `engine.ranks = "all"` and several ranks."""
    if cfg.engine.ranks != "all" or not isinstance(trainer, LeaderTrainer):
        return engine
    return RankEngines(engine, trainer.group)


class RankEngines:
    """`RolloutEngine` on rank 0 for the engines of every rank (`engine.ranks = "all"`)."""

    def __init__(self, local: RolloutEngine, group) -> None:
        self.local, self.group = local, group
        self.num_ranks = dist.get_world_size(group)

    def __getattr__(self, name: str):
        return getattr(self.local, name)  # everything but generation and memory turns: rank 0's engine

    def generate(self, requests: Sequence[GenerateRequest],
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        parts = shares(requests, self.num_ranks)
        self._send("generate", parts, self.local.weight_version)
        mine = self.local.generate(parts[0], on_progress=on_progress)
        answers: list = [None] * self.num_ranks
        dist.gather_object(mine, answers, dst=0, group=self.group)
        if on_progress is not None:
            on_progress(sum(len(generations) for answer in answers[1:] for generations in answer))
        return [generations for answer in answers for generations in answer]

    def release_memory(self, keep_weights: bool = True) -> dict[str, int]:
        self._send("release_memory", keep_weights)
        return self.local.release_memory(keep_weights=keep_weights)

    def resume_memory(self) -> None:
        self._send("resume_memory")
        self.local.resume_memory()

    def _send(self, name: str, *args) -> None:
        dist.broadcast_object_list([(PREFIX + name, args, {})], src=0, group=self.group)


class EngineFollower:
    """A follower rank's engine: runs rank 0's engine calls, takes the gathered weights."""

    def __init__(self, engine: RolloutEngine, sync: SyncConfig, group) -> None:
        self.engine, self.group = engine, group
        self.sync = InProcessSync(engine, sync)

    def handle(self, name: str, args: tuple) -> bool:
        """Run `name` if it is an engine call (True), else leave it to the trainer (False)."""
        if not name.startswith(PREFIX):
            return False
        name = name.removeprefix(PREFIX)
        if name == "generate":
            self._generate(*args)
        elif name == "release_memory":
            self.engine.release_memory(keep_weights=args[0])
        elif name == "resume_memory":
            self.engine.resume_memory()
        else:
            raise ValueError(f"unknown engine call '{name}' from rank 0")
        return True

    def take_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The trainer's exported (gathered) weights into this rank's engine, bucket by bucket as
        they are gathered; stamped with rank 0's version at the next `generate`."""
        self.sync.push(weights, version=self.engine.weight_version)

    def _generate(self, parts: list[list[GenerateRequest]], version: str) -> None:
        if self.engine.weight_version != version:
            self.engine.update_weights([], version=version)
        answer = self.engine.generate(parts[dist.get_rank(self.group)])
        dist.gather_object(answer, None, dst=0, group=self.group)
