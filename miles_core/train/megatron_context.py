"""Context parallelism (CP) for the megatron trainer (`train.context_parallel_size`, megatron's
`--context-parallel-size`): each sequence is split over the CP ranks of a model replica, and the
core attention that lets a rank's queries see the other ranks' keys.

Why this module exists: megatron-core's local (plain PyTorch) `DotProductAttention` asserts
CP = 1, and its CP attention lives in Transformer Engine, which cannot be installed here. So
with CP > 1 the layer spec gets `ContextParallelAttention` as its core attention
(`megatron_model.build_gpt`; Transformer Engine's spec too, when it imports, so that one tested
path runs everywhere); everything else is megatron-core's.

Split (megatron's load-balanced causal split, `get_batch_on_this_cp_rank`): the right-padded
(B, T) batch, T a multiple of 2 x CP (times TP under sequence parallelism), is cut into 2 x CP
chunks along T and CP rank r holds chunks r and 2 x CP - 1 - r, so every rank does the same
share of causal attention work. megatron-core's `RotaryEmbedding` slices the RoPE table the
same way itself (`get_pos_emb_on_this_cp_rank`: it sizes the table T_local x CP), so the local
ids need nothing else; `cpu_pos_emb_on_this_cp_rank` is that function without its CUDA-only
pinned copy, for CPU runs (`megatron_env`'s patches).

Attention: K and V of the rank's T / CP tokens are all-gathered over the CP group (megatron's
sequence-parallel gather on the CP group: its backward reduce-scatters, so each rank gets the
summed gradient of its own keys and values from every rank's queries). The gathered keys come
in rank order (rank 0's two chunks, then rank 1's, ...), so the (T / CP, T) mask is built from
the global positions of the local queries and of the gathered keys (`split_inputs`): masked
where the key's position is after the query's. Right padding sits after every real token, so
the causal mask alone keeps real tokens from attending to it, as on one rank. GQA: each query
head reads its group's key head. MLA (deepseek_v3): the same attention in place of
`megatron_mla.SDPACoreAttention`, with MLA's softmax scale and its v heads narrower than its q/k
heads; megatron-core's `MLASelfAttention` applies the decoupled RoPE before the core attention
with a `RotaryEmbedding` whose table it slices by the same `get_pos_emb_on_this_cp_rank`, so the
local queries and keys carry their global positions' rotations.

Log-probs (`ResponseRows`): each rank computes the log-probs and entropies of the response
tokens whose predicting position it holds; they are all-gathered (padded to the largest count)
and put back in sequence order, so every CP rank computes the same whole loss. The gather's
backward keeps this rank's slice of the gradient (every rank's loss is the same whole loss, so
nothing is summed there): each rank's parameter gradients are then its own tokens' part of the
one-rank gradient, and the trainer sums them over the CP ranks together with the data-parallel
replicas (megatron's data-parallel group with context parallelism; `megatron_data.reduce_grads`).
With pipeline stages every stage splits the sequence the same way and passes its CP rank's two
chunks on (`megatron_pipeline.py`); only the last stage computes and gathers log-probs, and each
stage's group with CP holds that stage's ranks, so every stage sums its own parameters' parts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from miles_core.errors import MilesError
from miles_core.train.megatron_mla import check_causal_without_dropout


@dataclass(frozen=True)
class ContextSplit:
    """This rank's place in its CP group (size 1: no context parallelism)."""

    size: int = 1
    rank: int = 0
    group: object = None

    def positions(self, length: int, device: torch.device | None = None) -> torch.Tensor:
        """(CP, length / CP) global positions each CP rank holds, in rank order: chunks r and
        2 x CP - 1 - r of the 2 x CP equal chunks."""
        chunks = torch.arange(length, device=device).view(2 * self.size, -1)
        return torch.stack([torch.cat([chunks[r], chunks[2 * self.size - 1 - r]]) for r in range(self.size)])


def context_split() -> ContextSplit:
    """From megatron-core's parallel state."""
    from megatron.core import parallel_state as ps

    size = ps.get_context_parallel_world_size()
    if size == 1:
        return ContextSplit()
    return ContextSplit(size, ps.get_context_parallel_rank(), ps.get_context_parallel_group())


def split_inputs(ids_BT: torch.Tensor, split: ContextSplit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's (B, T / CP) ids, their global positions and the (1, 1, T / CP, T) mask (True:
    masked) of its queries against the keys as `ContextParallelAttention` gathers them."""
    B, T = ids_BT.shape
    every = split.positions(T, ids_BT.device)  # (CP, T / CP)
    mine = every[split.rank]
    mask = every.flatten()[None, :] > mine[:, None]  # key after query
    return ids_BT[:, mine], mine[None, :].expand(B, -1), mask[None, None]


def cpu_pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """megatron-core's `get_pos_emb_on_this_cp_rank` (chunks r and 2 x CP - 1 - r of the RoPE
    table) with the index on the table's device: megatron's builds it in pinned host memory and
    moves it with `.cuda()`, which a CPU-only torch refuses."""
    size, rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([rank, 2 * size - rank - 1], device=pos_emb.device)
    chunks = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * size, -1, *pos_emb.shape[seq_dim + 1:])
    chunks = chunks.index_select(seq_dim, index)
    return chunks.view(*chunks.shape[:seq_dim], -1, *chunks.shape[seq_dim + 2:])


class ContextParallelAttention(nn.Module):
    """Core attention for CP > 1 in megatron-core's local spec (module docstring); takes
    `DotProductAttention`'s constructor and call arguments, [s, b, heads, dim] q/k/v."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, cp_comm_type: str | None = None,
                 pg_collection=None) -> None:
        from megatron.core import parallel_state

        super().__init__()
        check_causal_without_dropout("context-parallel", config, attn_mask_type, attention_dropout)
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise MilesError(f"the context-parallel core attention is plain softmax attention, got window_size "
                             f"{config.window_size}, softmax_type {config.softmax_type!r}")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.group = getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        if packed_seq_params is not None or attention_bias is not None:
            raise MilesError("the context-parallel core attention takes no packed sequences or attention bias")
        # One all-gather for K and V (same head count; MLA's v heads are narrower than its k heads,
        # so split at k's width); its backward reduce-scatters their gradients.
        dim = key.shape[-1]
        kv_TBGD = gather_from_sequence_parallel_region(torch.cat([key, value], dim=-1), True, self.group)
        q_BHSD = query.permute(1, 2, 0, 3)
        k_BGTD, v_BGTD = (t.permute(1, 2, 0, 3) for t in (kv_TBGD[..., :dim], kv_TBGD[..., dim:]))
        out_BHSD = F.scaled_dot_product_attention(q_BHSD, k_BGTD, v_BGTD, attn_mask=~attention_mask,
                                                  scale=self.softmax_scale, enable_gqa=True)
        S, B = query.shape[:2]
        return out_BHSD.permute(2, 0, 1, 3).reshape(S, B, -1)  # megatron's [s, b, h * dim]


def use_context_parallel_attention(block_spec):
    """A copy of the local block spec with `ContextParallelAttention` as every layer's core
    attention (the spec builders may hand out shared objects)."""
    block_spec = copy.deepcopy(block_spec)
    for layer in block_spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = ContextParallelAttention
    return block_spec


class _GatherRows(torch.autograd.Function):
    """(n_r, k) rows of each CP rank, concatenated in rank order; backward: this rank's slice."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, counts: list[int], split: ContextSplit) -> torch.Tensor:
        ctx.start, ctx.count = sum(counts[:split.rank]), counts[split.rank]
        width = max(counts)
        padded = F.pad(rows, (0, 0, 0, width - rows.shape[0])).contiguous()
        every = padded.new_empty((split.size * width, rows.shape[1]))
        dist.all_gather_into_tensor(every, padded, group=split.group)
        return torch.cat([every[r * width: r * width + n] for r, n in enumerate(counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.start: ctx.start + ctx.count], None, None


@dataclass(frozen=True)
class ResponseRows:
    """Where the micro-batch's N response-predicting positions (in sequence order: sample by
    sample) sit under CP: this rank's rows and local columns, their targets, and how to put
    every rank's values back in sequence order."""

    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    counts: list[int]
    order: torch.Tensor
    """(N,) index into the rank-ordered gather that gives sequence order."""
    split: ContextSplit

    @classmethod
    def build(cls, ids_BT: torch.Tensor, rows_N: torch.Tensor, cols_N: torch.Tensor, split: ContextSplit):
        """From the whole (B, T) ids and the response positions' (row, global column)."""
        every = split.positions(ids_BT.shape[1], ids_BT.device)
        owner, local = torch.empty_like(every.flatten()), torch.empty_like(every.flatten())
        owner[every.flatten()] = torch.arange(split.size, device=ids_BT.device).repeat_interleave(every.shape[1])
        local[every.flatten()] = torch.arange(every.shape[1], device=ids_BT.device).repeat(split.size)
        owner_N = owner[cols_N]
        mine = owner_N == split.rank
        order = torch.argsort(torch.argsort(owner_N, stable=True))
        counts = torch.bincount(owner_N, minlength=split.size).tolist()
        return cls(rows_N[mine], local[cols_N[mine]], ids_BT[rows_N, cols_N + 1][mine], counts, order, split)

    def gather(self, *values_n: torch.Tensor) -> list[torch.Tensor]:
        """Each (n,) per-token value of this rank's rows as the (N,) values of every rank, in
        sequence order (one collective for all of them)."""
        every_NK = _GatherRows.apply(torch.stack(values_n, dim=1), self.counts, self.split)
        return list(every_NK[self.order].unbind(1))
