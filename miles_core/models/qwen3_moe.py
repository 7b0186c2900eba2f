"""Qwen3-MoE (`transformers` Qwen3MoeForCausalLM, e.g. Qwen3-30B-A3B, Qwen3-235B-A22B).

Qwen3 attention (GQA with per-head q/k RMSNorm) and, in place of the MLP, a sparse MoE block:
softmax router over `num_experts`, top `num_experts_per_tok`, optional renormalisation
(`norm_topk_prob`), no shared expert (the HF class has none, unlike Qwen2-MoE). Layer i is
sparse unless it is in `mlp_only_layers` or (i + 1) is not a multiple of `decoder_sparse_step`;
dense layers use a SwiGLU MLP of `intermediate_size`. Parameter names are HF's.

MoE layer indices: the sparse layers, in model order, are MoE layers 0..num_moe_layers-1; that
is their key in a `RoutingContext` (`model.moe_layers[i]` is the decoder layer of MoE layer i).
Dense layers have no entry.

Shape legend: B batch, T tokens, E hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from miles_core.errors import MilesError
from miles_core.models.base import CausalLM
from miles_core.models.layers import (
    Attention, GatedMLP, Linear, RMSNorm, RotaryEmbedding, hf_common_args, hf_gqa_args,
)
from miles_core.models.moe import MoEDecoderLayer, RouterArgs, SparseMoE


@dataclass(frozen=True)
class Qwen3MoeArgs:
    """Model hyper-parameters, read from a HF `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    moe_layers: tuple[int, ...]
    """Decoder layer index of each MoE layer, in model order."""

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> Qwen3MoeArgs:
        if cfg.get("use_sliding_window"):
            raise MilesError("qwen3_moe with use_sliding_window=true is not supported; expected false")
        num_layers = cfg["num_hidden_layers"]
        # Published configs say `num_experts`; transformers 5 saves its alias `num_local_experts`.
        num_experts = cfg.get("num_experts", cfg.get("num_local_experts", 128))
        step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
        return cls(
            **hf_common_args(cfg, default_max_positions=32768), **hf_gqa_args(cfg),
            moe_intermediate_size=cfg["moe_intermediate_size"],
            num_experts=num_experts,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 8),
            norm_topk_prob=cfg.get("norm_topk_prob", False),
            moe_layers=tuple(i for i in range(num_layers)
                             if i not in dense and num_experts > 0 and (i + 1) % step == 0),
        )


def _attention(args: Qwen3MoeArgs, layer_idx: int) -> Attention:
    attn = Attention(hidden_size=args.hidden_size, num_heads=args.num_attention_heads,
                     num_kv_heads=args.num_key_value_heads, head_dim=args.head_dim,
                     qkv_bias=args.attention_bias, qk_norm=True, norm_eps=args.rms_norm_eps,
                     layer_idx=layer_idx)
    if args.attention_bias:  # unlike Llama's, Qwen3-MoE's o_proj has a bias with the flag too
        attn.o_proj = Linear(args.num_attention_heads * args.head_dim, args.hidden_size, bias=True)
    return attn


def _mlp(args: Qwen3MoeArgs, layer_idx: int) -> nn.Module:
    if layer_idx not in args.moe_layers:
        return GatedMLP(args.hidden_size, args.intermediate_size)
    router = RouterArgs(num_experts=args.num_experts, top_k=args.num_experts_per_tok,
                        scoring="softmax", norm_topk_prob=args.norm_topk_prob)
    return SparseMoE(hidden_size=args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
                     router=router, moe_index=args.moe_layers.index(layer_idx))


class Qwen3MoeModel(nn.Module):
    def __init__(self, args: Qwen3MoeArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(
            MoEDecoderLayer(_attention(args, i), _mlp(args, i), args.hidden_size, args.rms_norm_eps)
            for i in range(args.num_hidden_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)

    def forward(self, input_ids_BT, position_ids_BT, kv_cache=None, routing=None):
        x_BTE = self.embed_tokens(input_ids_BT)
        rope = self.rotary_emb(position_ids_BT, x_BTE.dtype)
        for layer in self.layers:
            x_BTE = layer(x_BTE, rope, position_ids_BT, kv_cache, routing)
        return self.norm(x_BTE)


class Qwen3MoeForCausalLM(CausalLM):
    def __init__(self, args: Qwen3MoeArgs) -> None:
        super().__init__(args, Qwen3MoeModel(args))
