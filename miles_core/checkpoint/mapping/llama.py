"""Llama, Qwen2 and Qwen3 <-> megatron-core `GPTModel`: GQA attention with fused QKV, SwiGLU MLP.

Norms are fused into the next linear as Transformer Engine names them: the input norm is
`self_attention.linear_qkv.layer_norm_weight`, the post-attention norm
`mlp.linear_fc1.layer_norm_weight`. Qwen2 adds q/k/v biases (`linear_qkv.bias`, fused like the
weight); Qwen3 adds per-head q/k RMSNorm (`q_layernorm`, `k_layernorm`). Tied embeddings are
megatron's `share_embeddings_and_output_weights`: no `output_layer.weight` is stored.
"""

from __future__ import annotations

from typing import Any

from miles_core.checkpoint.mapping.base import (
    BlockMap, Family, Heads, common_hf_config, common_megatron_args,
)
from miles_core.errors import MilesError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

GQA_ATTENTION = BlockMap(
    {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
        "self_attn.q_proj.weight": "self_attention.linear_qkv.weight",
        "self_attn.k_proj.weight": "self_attention.linear_qkv.weight",
        "self_attn.v_proj.weight": "self_attention.linear_qkv.weight",
        "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
        "self_attn.rotary_emb.inv_freq": None,
    },
    fused={"self_attention.linear_qkv.weight": "qkv"},
    aliases={"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight"},
)
QKV_BIAS = BlockMap(
    {
        "self_attn.q_proj.bias": "self_attention.linear_qkv.bias",
        "self_attn.k_proj.bias": "self_attention.linear_qkv.bias",
        "self_attn.v_proj.bias": "self_attention.linear_qkv.bias",
    },
    fused={"self_attention.linear_qkv.bias": "qkv"},
)
QK_NORM = BlockMap({
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
})
DENSE_MLP = BlockMap(
    {
        "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
        "mlp.gate_proj.weight": "mlp.linear_fc1.weight",
        "mlp.up_proj.weight": "mlp.linear_fc1.weight",
        "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    },
    fused={"mlp.linear_fc1.weight": "gate_up"},
    aliases={"pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"},
)


def has_qkv_bias(cfg: dict[str, Any]) -> bool:
    """Qwen2 always has q/k/v biases; the others only with `attention_bias`, which also adds an
    o_proj bias that megatron-core can only express together with MLP biases."""
    if cfg["model_type"] == "qwen2":
        return True
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise MilesError(f"{cfg['model_type']} with attention_bias/mlp_bias has no megatron-core "
                         "GPTModel equivalent (o_proj and MLP biases)")
    return False


def gqa_attention(cfg: dict[str, Any]) -> BlockMap:
    block = GQA_ATTENTION
    if has_qkv_bias(cfg):
        block = block | QKV_BIAS
    if cfg["model_type"] in ("qwen3", "qwen3_moe"):
        block = block | QK_NORM
    return block


def gqa_heads(cfg: dict[str, Any]) -> Heads:
    heads = cfg["num_attention_heads"]
    return Heads(heads, cfg.get("num_key_value_heads") or heads,
                 cfg.get("head_dim") or cfg["hidden_size"] // heads)


def gqa_megatron_args(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("hidden_act", "silu") != "silu":
        raise MilesError(f"hidden_act '{cfg['hidden_act']}' is not supported; expected silu (SwiGLU)")
    heads = gqa_heads(cfg)
    return {
        **common_megatron_args(cfg),
        "num_query_groups": heads.num_query_groups,
        "group_query_attention": heads.num_query_groups != heads.num_heads,
        "kv_channels": heads.head_dim,
        "add_qkv_bias": has_qkv_bias(cfg),
        "qk_layernorm": cfg["model_type"] in ("qwen3", "qwen3_moe"),
    }


def gqa_hf_config(args: dict[str, Any], model_type: str, architecture: str) -> dict[str, Any]:
    cfg = common_hf_config(args, model_type, architecture)
    heads = cfg["num_attention_heads"]
    cfg["num_key_value_heads"] = args.get("num_query_groups") or heads
    cfg["head_dim"] = args.get("kv_channels") or cfg["hidden_size"] // heads
    if model_type != "qwen2":
        cfg["attention_bias"] = False
    return cfg


FAMILY = Family(
    model_types=("llama", "qwen2", "qwen3"),
    layer_map=lambda cfg, i: gqa_attention(cfg) | DENSE_MLP,
    num_experts=lambda cfg, i: 0,
    megatron_args=gqa_megatron_args,
    hf_config=lambda args, model_type: gqa_hf_config(args, model_type, ARCHITECTURES[model_type]),
    heads=gqa_heads,
)
