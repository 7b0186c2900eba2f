"""MoE routing replay (R3) and routing records for megatron-core's `TopKRouter`.

megatron-core 0.16 routes through `topk_routing_with_score_function`, which asks the router's
`router_replay` object (when set) for the top-k: `get_replay_topk(scores, topk, num_groups,
group_topk, default_compute_topk)` returns (scores at the chosen ids, ids). `RoutingHooks` sets
one `_LayerHook` there per MoE layer (its own objects: megatron's `RouterReplay` keeps every
instance in a class-level list, which would mix the policy's and the reference's layers). A hook
with no active `RoutingContext` is megatron's plain top-k. With one, it computes megatron's own
top-k (recorded for `routing_agreement` and `routing_replay = "record"`) and hands it to
`RoutingContext.route`, which returns the ids to use (the recorded ones under replay); the scores
gathered at those ids then go through megatron's own normalisation (softmax over the k, or the
sigmoid sum and scaling factor), so the combine weights and the router's gradient are the ones
megatron computes for those experts, as the native MoE does under replay.

megatron's router sees the tokens flattened from its [s, b] layout (token index s * B + b); the
`RoutingContext` holds (B, T, K) per MoE layer, so the hook transposes between them. Under
sequence parallelism a TP rank's router sees only its 1/TP of the sequence: the hook gathers the
ranks' top-k in sequence order, every rank routes the whole (the same record on each), and each
keeps its own rows of the result. Under context parallelism a CP rank's router sees its two
chunks of the sequence (`megatron_context.py`): the hook gathers the CP ranks' rows too and puts
them in sequence order, and each rank keeps its chunks' rows of the result.

Pipeline stages (`megatron_pipeline.py`): a stage holds a contiguous run of the decoder layers,
so its MoE layers are a contiguous run of the global MoE layer indices (dense `mlp_only_layers` /
`first_k_dense_replace` layers are not counted). Its hooks carry those global indices, and its
context keeps only their replay entries (`RoutingHooks.context`), so every stage replays its own
layers and records them; the pipeline gathers the records on the last stage in layer order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from miles_core.models.routing import RoutingContext
from miles_core.train.megatron_context import ContextSplit, context_split
from miles_core.train.routing_replay import RoutingPlan


class _Active:
    """The context of the forward in flight, shared by one model's hooks: (ctx, B, T) or None."""

    current: tuple[RoutingContext, int, int] | None = None


class _LayerHook:
    """megatron's `router_replay` interface for MoE layer `layer` (its index among MoE layers)."""

    def __init__(self, layer: int, active: _Active, sequence_group=None, split: ContextSplit = ContextSplit()) -> None:
        self.layer, self.active = layer, active
        self.sequence_group = sequence_group
        """The TP group when sequence parallelism splits the router's tokens over it, else None."""
        self.split = split
        """This rank's CP place: under context parallelism the router sees its chunks only."""

    def get_replay_topk(self, scores: torch.Tensor, topk: int, num_groups: int | None, group_topk: int | None,
                        default_compute_topk: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        values, chosen_NK = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.active.current is None:
            return values, chosen_NK
        ctx, B, T = self.active.current
        whole_TBK = self._gather(chosen_NK, B, T)
        ids_BTK = ctx.route(self.layer, whole_TBK.transpose(0, 1))
        if ctx.mode == "record":
            return values, chosen_NK
        ids_NK = self._local(ids_BTK.transpose(0, 1), chosen_NK.shape[0])
        return scores.gather(1, ids_NK), ids_NK

    def _gather(self, chosen_NK: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """Every rank's top-k rows as (T, B, K) in sequence order: the TP ranks' parts
        (sequence parallelism), then the CP ranks' chunks."""
        if self.sequence_group is not None:
            size = dist.get_world_size(self.sequence_group)
            whole = chosen_NK.new_empty((size * chosen_NK.shape[0], chosen_NK.shape[1]))
            dist.all_gather_into_tensor(whole, chosen_NK.contiguous(), group=self.sequence_group)
            chosen_NK = whole
        if self.split.size == 1:
            return chosen_NK.view(T, B, -1)
        every = chosen_NK.new_empty((self.split.size * chosen_NK.shape[0], chosen_NK.shape[1]))
        dist.all_gather_into_tensor(every, chosen_NK.contiguous(), group=self.split.group)
        whole_TBK = torch.empty_like(every).view(T, B, -1)
        whole_TBK[self.split.positions(T, every.device).flatten()] = every.view(T, B, -1)
        return whole_TBK

    def _local(self, ids_TBK: torch.Tensor, rows: int) -> torch.Tensor:
        """This rank's `rows` of the (T, B, K) ids: its CP chunks, then its TP part of them."""
        if self.split.size > 1:
            ids_TBK = ids_TBK[self.split.positions(ids_TBK.shape[0], ids_TBK.device)[self.split.rank]]
        ids_NK = ids_TBK.reshape(-1, ids_TBK.shape[-1])
        if self.sequence_group is not None:
            rank = dist.get_rank(self.sequence_group)
            ids_NK = ids_NK[rank * rows:(rank + 1) * rows]
        return ids_NK


class RoutingHooks:
    """The replay/record hooks of one `GPTModel`'s (one pipeline stage's) MoE routers (none for a
    dense model): global MoE layers `first` .. `first + local - 1` of `layers`."""

    def __init__(self, model: nn.Module) -> None:
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.router import TopKRouter

        self._active = _Active()
        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]  # decoder layer order
        split = bool(routers) and model.config.sequence_parallel
        group = parallel_state.get_tensor_model_parallel_group() if split else None
        cp_split = context_split()
        pattern = moe_pattern(model.config)
        start = model.decoder.layers[0].layer_number - 1 if len(model.decoder.layers) else 0
        self.first, self.local, self.layers = sum(pattern[:start]), len(routers), sum(pattern)
        for layer, router in enumerate(routers, start=self.first):
            router.router_replay = _LayerHook(layer, self._active, group, cp_split)
        self.topk = model.config.moe_router_topk if self.layers else 0

    def context(self, plan: RoutingPlan, rows: list[tuple[int, int, int]], width: int, device) -> RoutingContext:
        """`plan.context` with only this stage's layers' replay entries (each stage replays its own)."""
        ctx = plan.context(rows, width, device)
        mine = range(self.first, self.first + self.local)
        ctx.replay = {layer: ids for layer, ids in ctx.replay.items() if layer in mine}
        return ctx

    def stacked(self, ctx: RoutingContext, batch: int, width: int) -> np.ndarray:
        """This stage's records of one forward, int32 (B, T, local, K) (`RoutingContext.stacked`)."""
        if not self.local:
            ctx.check_all_consumed()
            return np.zeros((batch, width, 0, self.topk), dtype=np.int32)
        return ctx.stacked()

    @contextlib.contextmanager
    def active(self, ctx: RoutingContext | None, batch: int, width: int):
        """Route the forward run inside through `ctx` (a (batch, width) input); None: megatron's own."""
        self._active.current = None if ctx is None else (ctx, batch, width)
        try:
            yield
        finally:
            self._active.current = None


def moe_pattern(config) -> list[int]:
    """1 for each MoE decoder layer, 0 for a dense one, over the whole model (megatron's
    `moe_layer_freq`: a list, or every n-th layer); all 0 for a dense model."""
    freq = config.moe_layer_freq
    if not config.num_moe_experts:
        return [0] * config.num_layers
    if isinstance(freq, int):
        return [int(i % freq == 0) for i in range(config.num_layers)]
    return list(freq)
