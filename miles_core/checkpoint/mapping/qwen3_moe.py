"""Qwen3-MoE <-> megatron-core `GPTModel` with MoE layers: Qwen3 attention, softmax top-k router,
routed experts stacked along megatron's expert dim, no shared experts.

An MoE layer keeps its post-attention norm as a module of its own (`pre_mlp_layernorm`, which
megatron-core's local spec writes as `mlp.linear_fc1.layer_norm_weight`: accepted on read).
Layers listed in `mlp_only_layers` (or skipped by `decoder_sparse_step`) are dense.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from miles_core.checkpoint.mapping.base import BlockMap, Family, need
from miles_core.checkpoint.mapping.llama import (
    DENSE_MLP, gqa_attention, gqa_heads, gqa_hf_config, gqa_megatron_args,
)

MOE_MLP = BlockMap(
    {"post_attention_layernorm.weight": "pre_mlp_layernorm.weight", "mlp.gate.weight": "mlp.router.weight"},
    aliases={"mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"},
)


def num_routed_experts(cfg: dict[str, Any]) -> int:
    # Released configs say `num_experts`; transformers 5 writes `num_local_experts`.
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)


def num_experts(cfg: dict[str, Any], i: int) -> int:
    step = cfg.get("decoder_sparse_step") or 1
    moe = i not in (cfg.get("mlp_only_layers") or []) and (i + 1) % step == 0
    return num_routed_experts(cfg) if moe else 0


def moe_layer_freq(experts: Callable[[dict[str, Any], int], int], cfg: dict[str, Any],
                   num_layers: int) -> int | list[int]:
    """Megatron's `moe_layer_freq`: 1 when every layer is MoE (megatron then stacks layers, as
    we write them), else the per-layer 0/1 pattern (megatron then keys each layer)."""
    pattern = [int(experts(cfg, i) > 0) for i in range(num_layers)]
    return 1 if all(pattern) else pattern


def megatron_args(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        **gqa_megatron_args(cfg),
        "num_experts": num_routed_experts(cfg),
        "moe_ffn_hidden_size": cfg["moe_intermediate_size"],
        "moe_router_topk": cfg["num_experts_per_tok"],
        # top-k then softmax over the k (megatron's default) is Qwen's norm_topk_prob
        "moe_router_pre_softmax": not cfg.get("norm_topk_prob", False),
        "moe_router_score_function": "softmax",
        "moe_layer_freq": moe_layer_freq(num_experts, cfg, cfg["num_hidden_layers"]),
        "moe_aux_loss_coeff": cfg.get("router_aux_loss_coef", 0.0),
    }


def hf_config(args: dict[str, Any], model_type: str) -> dict[str, Any]:
    need(args, "num_experts", "moe_ffn_hidden_size", "moe_router_topk")
    cfg = gqa_hf_config(args, model_type, "Qwen3MoeForCausalLM")
    freq = args.get("moe_layer_freq", 1)
    cfg.update({
        "num_experts": args["num_experts"], "moe_intermediate_size": args["moe_ffn_hidden_size"],
        "num_experts_per_tok": args["moe_router_topk"],
        "norm_topk_prob": not args.get("moe_router_pre_softmax", False), "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(freq) if not moe] if isinstance(freq, list) else [],
        "router_aux_loss_coef": args.get("moe_aux_loss_coeff", 0.001),
    })
    return cfg


FAMILY = Family(
    model_types=("qwen3_moe",),
    layer_map=lambda cfg, i: gqa_attention(cfg) | (MOE_MLP if num_experts(cfg, i) else DENSE_MLP),
    num_experts=num_experts,
    megatron_args=megatron_args,
    hf_config=hf_config,
    heads=gqa_heads,
)
