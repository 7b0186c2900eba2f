"""The megatron trainer's checkpoints: one megatron-core `dist_checkpointing` torch_dist checkpoint
with the weights, the AdamW moments and the reference model, sharded as the parameters are (any
tensor-parallel size reads it back), plus `trainer_state.pt` for the rest.

Layout of `DIR/` (what `save` writes and `load` reads; every rank calls both):
  torch_dist/release/     the torch_dist checkpoint: model tensors under megatron-core's own keys
                          (what `miles convert DIR/torch_dist OUT --to hf` reads), AdamW's
                          `exp_avg` / `exp_avg_sq` as `optimizer.state.<name>.<model key>` (megatron's
                          `optim_state_to_sharding_state`, as megatron's own optimizers save them),
                          the reference model under `reference.`; common.pt holds the HF config, the
                          optimizer's parameter groups and the iteration;
  torch_dist/latest_checkpointed_iteration.txt   "release";
  trainer_state.pt        schedule, counters, AdamW's step count of every parameter by its checkpoint
                          key and place on the stacked axes (layer, expert), gathered from every
                          rank, so another layout finds its own (rank 0 writes it).

AdamW's moments are created (zeros, step 0: what AdamW's first step would create) for parameters
that have none yet, so that saving and loading always see every tensor. Checkpoints of the
earlier layout (the optimizer and the reference model inside `trainer_state.pt`) still load.

Data-parallel replicas (`megatron_data.py`): every rank calls both; megatron's replica ids mark
the other replicas' copies as non-main, so `dist_checkpointing` writes the first replica's shards
once (the same files as without DP) and every rank reads its own shards back. Pipeline stages
save their own layers under the same global keys (megatron's layer offsets), so a checkpoint
written by PP stages is the one-stage checkpoint; the last stage's tied output layer is a copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from miles_core.errors import MilesError

CHECKPOINT_DIR = "torch_dist"
STATE_FILE = "trainer_state.pt"
REFERENCE_PREFIX = "reference."


def _params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def ensure_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero moments and step 0 for every parameter without state, as AdamW's `_init_group` makes them."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            if not optimizer.state[p]:
                step = torch.zeros((), dtype=torch.float32, device=p.device) if on_device else torch.tensor(0.0)
                optimizer.state[p].update(step=step, exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                                          exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, model_sharded: dict) -> tuple[dict[str, Any], list[str]]:
    """AdamW's state dict with each moment a sharded tensor shaped like its parameter's (the
    per-parameter step counts are left out: `trainer_state.pt` keeps them), and each optimizer
    parameter's name for those counts: its checkpoint key and stacked index, the same on any layout."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    ensure_adam_state(optimizer)
    state = optimizer.state_dict()
    by_id = get_param_id_to_sharded_param_map(model_sharded, _params(optimizer))
    names = []
    for index in range(len(_params(optimizer))):
        tensor = by_id[index].build()[0] if isinstance(by_id[index], ShardedTensorFactory) else by_id[index]
        names.append(f"{tensor.key}@{tuple(tensor.global_offset[:tensor.prepend_axis_num])}")
    optim_state_to_sharding_state(state, by_id, exclude_keys=("step",))
    return state, names


def save(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, reference: nn.Module | None,
         common: dict[str, Any], small: dict[str, Any]) -> None:
    """Write `directory` (see the module docstring); `common` goes to common.pt, `small` to
    trainer_state.pt (rank 0)."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank() if dist.is_initialized() else 0
    folder = directory / CHECKPOINT_DIR / "release"
    if rank == 0:
        folder.mkdir(parents=True)
    _barrier()
    state = {"model": model.sharded_state_dict(), **common}
    state["optimizer"], names = sharded_optimizer_state(optimizer, state["model"])
    steps = _gather({name: optimizer.state[p]["step"].item() for name, p in zip(names, _params(optimizer))})
    if reference is not None:
        state["reference"] = reference.sharded_state_dict(prefix=REFERENCE_PREFIX)
    dist_checkpointing.save(state, str(folder))
    if rank == 0:
        (directory / CHECKPOINT_DIR / "latest_checkpointed_iteration.txt").write_text("release", encoding="utf-8")
        with (directory / STATE_FILE).open("wb") as handle:  # a full disk is an OSError naming the file
            torch.save({**small, "optimizer_steps": steps}, handle)
    _barrier()


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, reference: nn.Module | None,
         device: torch.device) -> dict[str, Any]:
    """Restore the model, AdamW and the reference from `directory`; returns trainer_state.pt's dict."""
    from megatron.core import dist_checkpointing

    folder = directory / CHECKPOINT_DIR / "release"
    if not folder.is_dir():
        raise MilesError(f"'{directory}' holds no megatron trainer state ({CHECKPOINT_DIR}/release missing); "
                         "was it saved with another train.backend?")
    small = torch.load(directory / STATE_FILE, map_location=device, weights_only=True)
    request: dict[str, Any] = {"model": model.sharded_state_dict()}
    legacy = "optimizer" in small  # the earlier layout: one rank, optimizer in trainer_state.pt
    if not legacy:
        request["optimizer"], names = sharded_optimizer_state(optimizer, request["model"])
    if reference is not None and not legacy:
        request["reference"] = reference.sharded_state_dict(prefix=REFERENCE_PREFIX)
    loaded = dist_checkpointing.load(request, str(folder))
    model.load_state_dict(loaded["model"], strict=True)
    if legacy:
        optimizer.load_state_dict(small["optimizer"])
        if reference is not None and small.get("reference") is not None:
            reference.load_state_dict(small["reference"], strict=False)
        return small
    optim_state = loaded["optimizer"]
    for index, name in enumerate(names):
        optim_state["state"][index]["step"] = torch.tensor(small["optimizer_steps"][name], dtype=torch.float32)
    optimizer.load_state_dict(optim_state)
    if reference is not None:
        reference.load_state_dict({k.removeprefix(REFERENCE_PREFIX): v for k, v in loaded["reference"].items()},
                                  strict=True)
    return small


def _gather(steps: dict[str, float]) -> dict[str, float]:
    """Every rank's step counts in one dict (a rank's replicas and shards share a name and a count)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return steps
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, steps)
    return {name: step for part in every for name, step in part.items()}


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
