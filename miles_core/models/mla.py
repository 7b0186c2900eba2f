"""DeepSeek Multi-head Latent Attention (MLA; DeepSeek-V2, arXiv 2405.04434) with decoupled RoPE.

Queries: x -> q_a_proj (rank Q) -> q_a_layernorm -> q_b_proj, or one q_proj when `q_lora_rank`
is None; each head splits into [q_nope (P) | q_rope (R)]. Keys and values: x ->
kv_a_proj_with_mqa -> [latent (C) | k_rope (R, one head shared by all)]; latent ->
kv_a_layernorm -> kv_b_proj -> per head [k_nope (P) | v (V)]. RoPE turns only q_rope and the
shared k_rope; k = [k_nope | k_rope]. With `rope_interleave` (the DeepSeek checkpoints' layout,
HF's default) the rotary dims come as (even, odd) pairs: gathering evens then odds and applying
the usual rotate-half RoPE gives exactly HF's `apply_rotary_pos_emb_interleave` output.

Softmax scale: 1/sqrt(P + R), times mscale^2 where mscale = yarn_mscale(factor, mscale_all_dim)
when a YaRN config sets `mscale_all_dim` (HF's `yarn_apply_mscale`). The attention kernels apply
1/sqrt(D) themselves, so the extra factor is folded into q.

KV cache: the full per-head k (P + R) and v (V) after the up-projection. Simple and exact;
caching the normalised latent and the rotated k_rope instead would take C + R numbers per token
rather than H * (P + R + V), at the cost of re-expanding it on every step.

Shape legend: B batch, T tokens, H heads, D = P + R qk head dim, P nope dims, R rope dims,
V value head dim, C kv_lora_rank, E hidden size.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from miles_core.kernels import FAST_OPS, Ops
from miles_core.models.layers import KVCache, Linear, RMSNorm, apply_rotary, cached_attention, yarn_mscale


class MLAArgs(Protocol):
    """The hyper-parameters MLA reads (`deepseek_v3.DeepseekV3Args` has them)."""

    hidden_size: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_scaling: dict[str, Any] | None
    rope_interleave: bool
    attention_bias: bool


# HF builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not `rms_norm_eps`.
LORA_NORM_EPS = 1e-6


def softmax_scale_factor(args: MLAArgs) -> float:
    """mscale^2 by which YaRN multiplies the 1/sqrt(D) softmax scale (1 without YaRN)."""
    scaling = args.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default" or not scaling.get("mscale_all_dim"):
        return 1.0
    return yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2


class MLAttention(nn.Module):
    ops: Ops = FAST_OPS

    def __init__(self, args: MLAArgs, layer_idx: int) -> None:
        super().__init__()
        E, H, C = args.hidden_size, args.num_attention_heads, args.kv_lora_rank
        self.num_heads, self.layer_idx, self.kv_lora_rank = H, layer_idx, C
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.rope_interleave, self.q_lora = args.rope_interleave, args.q_lora_rank is not None
        self.scale_factor = softmax_scale_factor(args)
        qk_dim = self.nope_dim + self.rope_dim
        if not self.q_lora:
            self.q_proj = Linear(E, H * qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(E, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, LORA_NORM_EPS)
            self.q_b_proj = Linear(args.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(E, C + self.rope_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(C, LORA_NORM_EPS)
        self.kv_b_proj = Linear(C, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, E, bias=args.attention_bias)

    def _queries(self, x_BTE: torch.Tensor) -> torch.Tensor:
        if self.q_lora:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTE)))
        return self.q_proj(x_BTE)

    def _rotate(self, x_BHTR: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.rope_interleave:
            x_BHTR = torch.cat((x_BHTR[..., 0::2], x_BHTR[..., 1::2]), dim=-1)
        return apply_rotary(x_BHTR, *rope)

    def forward(self, x_BTE: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                position_ids_BT: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x_BTE.shape
        H, P, R, V = self.num_heads, self.nope_dim, self.rope_dim, self.v_dim
        q_BHTD = self._queries(x_BTE).view(B, T, H, P + R).transpose(1, 2)
        q_nope, q_rope = q_BHTD.split([P, R], dim=-1)
        latent_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTE).split([self.kv_lora_rank, R], dim=-1)
        kv_BHTX = self.kv_b_proj(self.kv_a_layernorm(latent_BTC)).view(B, T, H, P + V).transpose(1, 2)
        k_nope, v_BHTV = kv_BHTX.split([P, V], dim=-1)
        k_rope_B1TR = self._rotate(k_rope_BTR.view(B, 1, T, R), rope)
        q_BHTD = torch.cat((q_nope, self._rotate(q_rope, rope)), dim=-1)
        k_BHTD = torch.cat((k_nope, k_rope_B1TR.expand(B, H, T, R)), dim=-1)
        if self.scale_factor != 1.0:
            q_BHTD = q_BHTD * self.scale_factor
        out_BHTV = cached_attention(self, kv_cache, q_BHTD, k_BHTD, v_BHTV, position_ids_BT)
        return self.o_proj(out_BHTV.transpose(1, 2).reshape(B, T, H * V))
