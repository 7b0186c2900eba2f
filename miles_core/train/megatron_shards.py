"""Each rank's part of a megatron-core parameter under tensor parallelism, read from megatron-core's
own checkpoint metadata; the gradient reductions and the norm that this split needs.

megatron-core describes every parameter it checkpoints by a `ShardedTensor`: the global shape
(layers, and experts, stacked in front), this rank's offset in it and whether this copy is the
main replica. Column-parallel weights (fused QKV, which megatron lays out by query group so that
a contiguous block of rows is whole groups) are split on dim 0, row-parallel ones on dim 1, the
embedding and output layer on the vocabulary; norms are replicated (main on TP rank 0 only).
The SwiGLU `linear_fc1` is a factory that builds two `ShardedTensor`s: its gate and up halves are
each split, so a rank holds [gate_r; up_r], two views of one parameter. `Shard` keeps what miles
needs of this: a view into the parameter and the region of the full (per-layer, per-expert)
tensor it holds. Nothing here names a layer: the metadata says where every piece goes.

Loading copies each region of the full tensor into its view. Exporting is a collective in the
plan's order: every rank sends its main pieces that rank 0 lacks, and rank 0 assembles the full
tensors (plain copies: bitwise). Data-parallel replicas (`megatron_data.py`) hold non-main copies
of everything (megatron's replica id counts the DP rank), so the main pieces are the first
replica's and rank 0 holds the main copy of everything replicated within it.

Expert parallelism (EP ranks, TP = 1) gives each rank its own routed experts; the rest of the
model is replicated (megatron-core's data-parallel copies, main on rank 0) and every rank of a
replica runs the same micro-batches. The allgather dispatcher then hands each expert the tokens of every
rank, EP identical copies, so its weight gradient is EP times the one-copy gradient: it is
divided by EP (exactly, for EP a power of two). The replicated parameters' gradients are
averaged over the ranks, as megatron's data parallelism does, which keeps the copies bitwise
equal. Both, with the sums over data-parallel replicas, are `megatron_data.reduce_grads`.

Gradients under TP: a replicated parameter gets the same gradient on every TP rank, except the
q/k norms, which see only this rank's heads: their gradients are summed over the TP group first,
by megatron-core's own rule (`finalize_model_grads._allreduce_non_tensor_model_parallel_grads`;
not MLA's q/kv norms, which see every head: `megatron_mla.py`).
The gradient norm counts every element once: each rank's shards plus the replicated parameters
of rank 0, summed over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Shard:
    """A view of (part of) a parameter and where it sits in the full tensor."""

    data: torch.Tensor
    offset: tuple[int, ...]
    full_shape: tuple[int, ...]
    main: bool
    """Whether this copy is the one a checkpoint (or an export) takes; replicas are not."""
    stacked: tuple[int, ...]
    """Its index along the stacked axes in front (layer, then the global expert for experts)."""
    replica_main: bool = True
    """Whether this copy is the main one among the ranks of its model replica: megatron's replica
    id (pipeline, tensor, data) without the data-parallel part."""

    def region(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.data.shape))

    def whole(self) -> bool:
        return tuple(self.data.shape) == self.full_shape


def shards_of(item) -> list[Shard]:
    """The shards of one `sharded_state_dict()` entry (a factory builds several views)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory, is_main_replica

    pieces = item.build() if isinstance(item, ShardedTensorFactory) else [item]
    out = []
    for piece in pieces:
        lead = piece.prepend_axis_num  # the stacked layer (and expert) axes
        replica = piece.replica_id if isinstance(piece.replica_id, tuple) else (piece.replica_id,)
        out.append(Shard(piece.data, tuple(piece.global_offset[lead:]), tuple(piece.global_shape[lead:]),
                         is_main_replica(piece.replica_id), tuple(piece.global_offset[:lead]),
                         all(r == 0 for r in replica[:2])))
    return out


@dataclass(frozen=True)
class Piece:
    """A main shard as the exporting rank 0 sees it: which rank holds it and where it goes."""

    rank: int
    index: int
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    full_shape: tuple[int, ...]
    dtype: torch.dtype

    def region(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.shape))


def layout(shards: dict) -> dict:
    """Every slot's main pieces on every rank, for the slots of all ranks (expert parallelism gives
    each rank its own experts); a collective: every rank calls it with its shards."""
    mine = {slot: [Piece(0, i, s.offset, tuple(s.data.shape), s.full_shape, s.data.dtype)
                   for i, s in enumerate(pieces) if s.main] for slot, pieces in shards.items()}
    every = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    out: dict = {}
    for rank, theirs in enumerate(every):
        for slot, pieces in theirs.items():
            out.setdefault(slot, []).extend(replace(p, rank=rank) for p in pieces)
    return out


def assemble(local: list[Shard], pieces: list[Piece], rank: int, device: torch.device) -> torch.Tensor | None:
    """The full tensor on rank 0 (None elsewhere): its own pieces copied in, the others received
    in order from the ranks holding them, which send them here. A whole local main shard on rank
    0 is returned as is (no copy), as one rank always did."""
    if rank == 0 and len(pieces) == 1 and pieces[0].rank == 0 and local[pieces[0].index].whole():
        return local[pieces[0].index].data.detach()
    if rank != 0:
        for piece in pieces:
            if piece.rank == rank:
                dist.send(local[piece.index].data.detach().contiguous(), dst=0)
        return None
    full = torch.empty(pieces[0].full_shape, dtype=pieces[0].dtype, device=device)
    for piece in pieces:
        if piece.rank == 0:
            full[piece.region()].copy_(local[piece.index].data.detach())
        else:
            received = torch.empty(piece.shape, dtype=piece.dtype, device=device)
            dist.recv(received, src=piece.rank)
            full[piece.region()].copy_(received)
    return full


def reduce_grads(model: nn.Module, tp_group, tp_size: int) -> None:
    """Complete the gradients of one model replica split over its TP ranks: the q/k norms' partial
    gradients summed (see the module docstring), and under sequence parallelism those of the
    parameters marked `sequence_parallel` (the norms, each rank saw 1/TP of the tokens); the sums
    over replicas and EP copies are `megatron_data.reduce_grads`'."""
    if tp_size == 1:
        return
    # MLA's q/kv norms act on the latents, whole on every rank: partial only under sequence
    # parallelism, where they are marked (`megatron_mla.py`).
    head_norms = not getattr(model.config, "multi_latent_attention", False)
    for name, param in model.named_parameters():
        partial = getattr(param, "sequence_parallel", False) or (
            head_norms and ("q_layernorm" in name or "k_layernorm" in name))
        if param.grad is not None and partial:
            dist.all_reduce(param.grad, group=tp_group)


def grad_norm(params: list[nn.Parameter], duplicates: set[int]) -> torch.Tensor:
    """The 2-norm of the whole model's gradient: each rank's shards, the replicated parameters
    (`duplicates`: ids of this rank's non-main copies, left out) once, summed over the ranks."""
    grads = [p.grad for p in params if p.grad is not None and id(p) not in duplicates]
    sum_sq = torch.zeros((), dtype=torch.float32, device=params[0].device)
    if grads:
        sum_sq = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32)
                                                       for g in grads])) ** 2
    dist.all_reduce(sum_sq)
    return sum_sq.sqrt()
