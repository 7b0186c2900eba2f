"""Sparse mixture-of-experts shared by the MoE families (Qwen3-MoE, DeepSeek-V3): the router,
the routed experts, optional shared experts, the pre-norm decoder block around them, and the
record/replay hook of Rollout Routing Replay (R3).

Routing. The router scores every expert for every token and picks top-k ids; the
`RoutingContext` then says which ids to use (record: the router's own; replay: the recorded
ones), and the combine weights are the router's probabilities gathered at the ids actually
used, so under replay the router still gets a gradient. Two scorers, as in `transformers`:
- softmax (Qwen3-MoE): p = softmax(logits) in fp32, ids = topk(p), w = p[ids], divided by
  their sum when `norm_topk_prob`.
- sigmoid (DeepSeek-V3 "noaux_tc"): s = sigmoid(logits) in fp32. Selection only uses
  s + e_score_correction_bias, restricted to the best `topk_group` of `n_group` expert groups
  (a group scores the sum of its two best biased scores). w = s[ids] without the bias, divided
  by (sum + 1e-20) when `norm_topk_prob`, times `routed_scaling_factor`.

Experts. `grouped_experts` sorts the A = N*K token->expert assignments by expert id and runs
each expert once on its contiguous slice (a loop over experts, never over tokens). It puts
the outputs back in assignment order and sums each token's K outputs times their weights in
fp32, in a fixed order. It does not use index_add: on CUDA that accumulates with atomics whose
order varies from run to run, while the fixed sum over K is deterministic and does not depend
on the batch. `reference_experts` runs every expert on every token and masks: slow, for tests.

Layout. Experts are a ModuleList of `GatedMLP`, named `experts.{e}.{gate,up,down}_proj` as
published checkpoints store them, and as `transformers` 5 writes them on `save_pretrained`
(in memory it stacks them into 3-D `experts.gate_up_proj` / `experts.down_proj` and converts
back on save). So checkpoints load with no renaming, and every expert matmul goes through
`layers.Linear`: the kernel choice and quantised-module swaps apply to experts too.

Shape legend: B batch, T tokens, N = B*T tokens, E hidden size, X experts, K top-k,
A = N*K assignments, G expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from miles_core.errors import MilesError
from miles_core.models.layers import GatedMLP, KVCache, Linear, RMSNorm
from miles_core.models.routing import RoutingContext


@dataclass(frozen=True)
class RouterArgs:
    """How a MoE layer picks and weighs its experts (HF config names)."""

    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"]
    norm_topk_prob: bool
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0


class TopKRouter(Linear):
    """`mlp.gate`: one logit per expert. With sigmoid scoring it also holds the selection-only
    `e_score_correction_bias`, a buffer: aux-loss-free balancing sets it, gradients do not."""

    def __init__(self, hidden_size: int, args: RouterArgs) -> None:
        super().__init__(hidden_size, args.num_experts, bias=False)
        self.args = args
        if args.scoring == "sigmoid":
            self.register_buffer("e_score_correction_bias", torch.zeros(args.num_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 probabilities (N, X), chosen expert ids (N, K))."""
        # DeepSeek keeps the router weight in fp32 (see `keep_in_fp32`), and HF computes its
        # logits in fp32; a Qwen router stays in the activations' dtype, as in HF.
        logits_NX = super().forward(x_NE.to(self.weight.dtype)).float()
        if self.args.scoring == "softmax":
            probs_NX = self.ops.softmax(logits_NX)
            return probs_NX, probs_NX.topk(self.args.top_k, dim=-1).indices
        scores_NX = self.ops.sigmoid(logits_NX)
        biased_NX = scores_NX + self.e_score_correction_bias
        return scores_NX, group_limited_topk(biased_NX, self.args.top_k, self.args.n_group, self.args.topk_group)

    def combine_weights(self, probs_NX: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
        """fp32 weights (N, K) of the experts `ids_NK`, normalised and scaled as HF does."""
        weights_NK = probs_NX.gather(1, ids_NK)
        if self.args.scoring == "softmax":
            return weights_NK / weights_NK.sum(-1, keepdim=True) if self.args.norm_topk_prob else weights_NK
        if self.args.norm_topk_prob:
            weights_NK = weights_NK / (weights_NK.sum(-1, keepdim=True) + 1e-20)
        return weights_NK * self.args.routed_scaling_factor


def group_limited_topk(scores_NX: torch.Tensor, top_k: int, n_group: int, topk_group: int) -> torch.Tensor:
    """Top-k expert ids (N, K) among the `topk_group` best of `n_group` contiguous groups."""
    N, X = scores_NX.shape
    group_scores_NG = scores_NX.view(N, n_group, X // n_group).topk(2, dim=-1).values.sum(-1)
    best_groups = group_scores_NG.topk(topk_group, dim=-1, sorted=False).indices
    group_mask_NG = torch.zeros_like(group_scores_NG).scatter_(1, best_groups, 1.0)
    expert_mask_NX = group_mask_NG[:, :, None].expand(N, n_group, X // n_group).reshape(N, X).bool()
    masked_NX = scores_NX.masked_fill(~expert_mask_NX, float("-inf"))
    return masked_NX.topk(top_k, dim=-1, sorted=False).indices


def grouped_experts(experts: nn.ModuleList, x_NE: torch.Tensor, ids_NK: torch.Tensor,
                    weights_NK: torch.Tensor) -> torch.Tensor:
    """sum_k weights[n, k] * experts[ids[n, k]](x[n]), each expert run once on its tokens."""
    N, K = ids_NK.shape
    ids_A = ids_NK.reshape(-1)
    order_A = ids_A.argsort(stable=True)  # assignments grouped by expert
    counts = torch.bincount(ids_A, minlength=len(experts)).tolist()
    if len(counts) > len(experts):
        raise MilesError(f"expert id {len(counts) - 1} out of range: the layer has {len(experts)} experts")
    chunks = x_NE[order_A // K].split(counts)  # each (tokens of expert e, E)
    y_AE = torch.cat([experts[e](chunk) if len(chunk) else chunk for e, chunk in enumerate(chunks)])
    y_NKE = y_AE[order_A.argsort()].view(N, K, -1)  # back to assignment order
    return (y_NKE.float() * weights_NK[..., None].float()).sum(1).to(x_NE.dtype)


def reference_experts(experts: nn.ModuleList, x_NE: torch.Tensor, ids_NK: torch.Tensor,
                      weights_NK: torch.Tensor) -> torch.Tensor:
    """Same result as `grouped_experts`: every expert on every token, weight 0 where unrouted."""
    out_NE = torch.zeros(x_NE.shape, dtype=torch.float32, device=x_NE.device)
    for e, expert in enumerate(experts):
        weight_N = (weights_NK.float() * (ids_NK == e)).sum(-1)
        out_NE = out_NE + expert(x_NE).float() * weight_N[:, None]
    return out_NE.to(x_NE.dtype)


class SparseMoE(nn.Module):
    """Router + routed experts (+ shared experts, always on), HF names `gate`, `experts`,
    `shared_experts`. `moe_index` is this layer's key in a `RoutingContext`."""

    def __init__(self, *, hidden_size: int, moe_intermediate_size: int, router: RouterArgs,
                 moe_index: int, shared_intermediate_size: int = 0) -> None:
        super().__init__()
        self.moe_index = moe_index
        self.gate = TopKRouter(hidden_size, router)
        self.experts = nn.ModuleList(GatedMLP(hidden_size, moe_intermediate_size)
                                     for _ in range(router.num_experts))
        self.shared_experts = (GatedMLP(hidden_size, shared_intermediate_size)
                               if shared_intermediate_size else None)

    def forward(self, x_BTE: torch.Tensor, routing: RoutingContext | None = None) -> torch.Tensor:
        B, T, E = x_BTE.shape
        x_NE = x_BTE.reshape(B * T, E)
        probs_NX, chosen_NK = self.gate(x_NE)
        ids_BTK = chosen_NK.view(B, T, -1)
        if routing is not None:
            ids_BTK = routing.route(self.moe_index, ids_BTK)
        ids_NK = ids_BTK.reshape(B * T, -1)
        weights_NK = self.gate.combine_weights(probs_NX, ids_NK)
        out_BTE = grouped_experts(self.experts, x_NE, ids_NK, weights_NK).view(B, T, E)
        if self.shared_experts is not None:
            out_BTE = out_BTE + self.shared_experts(x_BTE)
        return out_BTE


class MoEDecoderLayer(nn.Module):
    """Pre-norm block x + attn(norm(x)), then x + mlp(norm(x)); `mlp` is a dense `GatedMLP`
    or a `SparseMoE` (which alone sees the routing context)."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = mlp

    def forward(self, x_BTE: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], position_ids_BT: torch.Tensor,
                kv_cache: KVCache | None, routing: RoutingContext | None) -> torch.Tensor:
        x_BTE = x_BTE + self.self_attn(self.input_layernorm(x_BTE), rope, position_ids_BT, kv_cache)
        h_BTE = self.post_attention_layernorm(x_BTE)
        return x_BTE + (self.mlp(h_BTE, routing) if isinstance(self.mlp, SparseMoE) else self.mlp(h_BTE))
