"""Data parallelism applied to a built model, outside `models/`: the process group, FSDP2
sharding with mixed precision, and how an optimizer step's samples are split across ranks.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every parameter of each decoder layer and of
the root (embeddings, final norm, lm_head) across the ranks as DTensors; a forward all-gathers one
layer's parameters at a time (in `param_dtype`), a backward reduce-scatters its gradients (in
`reduce_dtype`). Gradients are summed, not averaged, over ranks (divide factor 1): the trainer's
losses use the global token and sequence counts as denominators, so the sum over ranks of the
per-rank losses is the one-process loss and the summed gradient is its gradient.

Every rank must run the same number of forwards and backwards (each one is a collective); the
trainer pads a rank that has fewer micro-batches with zero-weight ones (`fsdp.py`).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from miles_core.train.batch import prompt_groups


def ensure_process_group(device: torch.device) -> bool:
    """A one-rank group when none was started (`train.backend = "fsdp"` in one process): NCCL for
    a model on a GPU (FSDP's collectives take the GPU tensors as they are), else gloo; a launcher
    (`launch/local.py`) starts the N-rank group before the trainer is built. True when it started
    one (the caller destroys it when done)."""
    if dist.is_initialized():
        return False
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    return True


def broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (each rank built the model itself)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def apply_fsdp(root: nn.Module, layers: Sequence[nn.Module], compute_dtype: torch.dtype) -> None:
    """Shard each of `layers`, then `root` (everything left: embeddings, norm, lm_head, shared
    ones once). Compute in `compute_dtype`, reduce gradients in fp32, keep fp32 masters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(root, mp_policy=policy)
    for module in [*layers, root]:
        module.set_gradient_divide_factor(1.0)  # sum over ranks: the losses carry global denominators
        module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)


def split_by_tokens(tokens: Sequence[torch.Tensor], response_lengths: Sequence[int], world_size: int,
                    share_prompt_prefix: bool) -> list[list[int]]:
    """Sample indices of each rank, balanced by tokens: units (prompt groups when
    `share_prompt_prefix`, so each prompt is still computed once; else single samples) go
    longest first to the rank with the fewest tokens so far (lowest rank on ties). Every rank
    computes the same split from the same batch."""
    units = prompt_groups(tokens, response_lengths) if share_prompt_prefix else [[i] for i in range(len(tokens))]
    cost = [_unit_tokens(unit, tokens, response_lengths, share_prompt_prefix) for unit in units]
    loads, out = [0] * world_size, [[] for _ in range(world_size)]
    for u in sorted(range(len(units)), key=lambda u: (-cost[u], u)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += cost[u]
        out[rank] += units[u]
    return [sorted(indices) for indices in out]


def _unit_tokens(unit: list[int], tokens: Sequence[torch.Tensor], response_lengths: Sequence[int],
                 shared: bool) -> int:
    """Tokens a unit costs a forward: a shared prompt once, then each response."""
    if not shared:
        return sum(len(tokens[i]) for i in unit)
    prompt = len(tokens[unit[0]]) - response_lengths[unit[0]]
    return prompt + sum(response_lengths[i] for i in unit)
