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
`RoutingContext` holds (B, T, K) per MoE layer, so the hook transposes between them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from miles_core.models.routing import RoutingContext


class _Active:
    """The context of the forward in flight, shared by one model's hooks: (ctx, B, T) or None."""

    current: tuple[RoutingContext, int, int] | None = None


class _LayerHook:
    """megatron's `router_replay` interface for MoE layer `layer` (its index among MoE layers)."""

    def __init__(self, layer: int, active: _Active) -> None:
        self.layer, self.active = layer, active

    def get_replay_topk(self, scores: torch.Tensor, topk: int, num_groups: int | None, group_topk: int | None,
                        default_compute_topk: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        values, chosen_NK = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.active.current is None:
            return values, chosen_NK
        ctx, B, T = self.active.current
        chosen_BTK = chosen_NK.view(T, B, topk).transpose(0, 1)
        ids_BTK = ctx.route(self.layer, chosen_BTK)
        if ctx.mode == "record":
            return values, chosen_NK
        ids_NK = ids_BTK.transpose(0, 1).reshape(T * B, topk)
        return scores.gather(1, ids_NK), ids_NK


class RoutingHooks:
    """The replay/record hooks of one `GPTModel`'s MoE routers (none for a dense model)."""

    def __init__(self, model: nn.Module) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self._active = _Active()
        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]  # decoder layer order
        for layer, router in enumerate(routers):
            router.router_replay = _LayerHook(layer, self._active)
        self.layers = len(routers)
        self.topk = routers[0].topk if routers else 0

    @contextlib.contextmanager
    def active(self, ctx: RoutingContext | None, batch: int, width: int):
        """Route the forward run inside through `ctx` (a (batch, width) input); None: megatron's own."""
        self._active.current = None if ctx is None else (ctx, batch, width)
        try:
            yield
        finally:
            self._active.current = None
