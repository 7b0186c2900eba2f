"""DeepSeek-V3 <-> megatron-core `GPTModel` with multi-latent attention, MoE and MTP layers.

MLA names follow megatron-core's MLA layer spec with Transformer Engine: q/kv down projections
(`linear_q_down_proj`, `linear_kv_down_proj`), up projections with their norm fused in
(`linear_q_up_proj.layer_norm_weight` is HF `q_a_layernorm`, `linear_kv_up_proj.layer_norm_weight`
is `kv_a_layernorm`), `linear_q_proj` when the model has no q LoRA; the input norm stays its own
module. The local spec's `self_attention.q_layernorm` / `kv_layernorm` are accepted on read.
No permutation is needed: megatron's MLA RoPE de-interleaves like HF's `rope_interleave`.

The router is sigmoid-scored with a selection bias (`e_score_correction_bias` <->
`mlp.router.expert_bias`), group-limited, scaled by `routed_scaling_factor`; shared experts are
one SwiGLU MLP (`mlp.shared_experts.linear_fc1` = cat(gate, up)). The first
`first_k_dense_replace` layers are dense, which makes megatron write per-layer keys.
"""

from __future__ import annotations

from typing import Any

from miles_core.checkpoint.mapping.base import (
    BlockMap, Family, common_hf_config, common_megatron_args, need,
)
from miles_core.checkpoint.mapping.llama import DENSE_MLP
from miles_core.checkpoint.mapping.qwen3_moe import moe_layer_freq
from miles_core.errors import MilesError

MLA = BlockMap(
    {
        "input_layernorm.weight": "input_layernorm.weight",
        "self_attn.q_a_proj.weight": "self_attention.linear_q_down_proj.weight",
        "self_attn.q_a_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
        "self_attn.q_b_proj.weight": "self_attention.linear_q_up_proj.weight",
        "self_attn.kv_a_proj_with_mqa.weight": "self_attention.linear_kv_down_proj.weight",
        "self_attn.kv_a_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
        "self_attn.kv_b_proj.weight": "self_attention.linear_kv_up_proj.weight",
        "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    },
    aliases={
        "self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
        "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
    },
)
_Q_LORA = ("self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight")
MLA_NO_Q_LORA = BlockMap(
    {**{k: v for k, v in MLA.keys.items() if k not in _Q_LORA},
     "self_attn.q_proj.weight": "self_attention.linear_q_proj.weight"},
    aliases={"self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight"},
)
MOE_MLP = BlockMap(
    {
        "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
        "mlp.gate.weight": "mlp.router.weight",
        "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
        "mlp.shared_experts.gate_proj.weight": "mlp.shared_experts.linear_fc1.weight",
        "mlp.shared_experts.up_proj.weight": "mlp.shared_experts.linear_fc1.weight",
        "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.linear_fc2.weight",
    },
    fused={"mlp.shared_experts.linear_fc1.weight": "gate_up"},
    aliases={"mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"},
)


def num_experts(cfg: dict[str, Any], i: int) -> int:
    freq = cfg.get("moe_layer_freq") or 1
    moe = i >= cfg.get("first_k_dense_replace", 0) and i % freq == 0
    return int(cfg.get("n_routed_experts") or 0) if moe else 0


def layer_map(cfg: dict[str, Any], i: int) -> BlockMap:
    if cfg.get("attention_bias"):
        raise MilesError("deepseek_v3 with attention_bias has no megatron-core MLA equivalent")
    attention = MLA if cfg.get("q_lora_rank") else MLA_NO_Q_LORA
    return attention | (MOE_MLP if num_experts(cfg, i) else DENSE_MLP)


def megatron_args(cfg: dict[str, Any]) -> dict[str, Any]:
    num_layers = cfg["num_hidden_layers"]
    return {
        **common_megatron_args(cfg),
        **_rope_args(cfg),
        "multi_latent_attention": True, "q_lora_rank": cfg.get("q_lora_rank"),
        "kv_lora_rank": cfg["kv_lora_rank"], "qk_head_dim": cfg["qk_nope_head_dim"],
        "qk_pos_emb_head_dim": cfg["qk_rope_head_dim"], "v_head_dim": cfg["v_head_dim"],
        "num_query_groups": cfg["num_attention_heads"], "qk_layernorm": True,
        "num_experts": cfg["n_routed_experts"], "moe_ffn_hidden_size": cfg["moe_intermediate_size"],
        "moe_router_topk": cfg["num_experts_per_tok"],
        "moe_shared_expert_intermediate_size": (cfg.get("n_shared_experts") or 0) * cfg["moe_intermediate_size"] or None,
        "moe_layer_freq": moe_layer_freq(num_experts, cfg, num_layers),
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
        "moe_router_topk_scaling_factor": cfg.get("routed_scaling_factor", 1.0),
        "moe_router_num_groups": cfg.get("n_group"), "moe_router_group_topk": cfg.get("topk_group"),
        "moe_router_pre_softmax": True,
    }


def _rope_args(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "yarn":
        return {"rope_type": "rope"}
    return {"rope_type": "yarn", "rotary_scaling_factor": rope["factor"],
            "original_max_position_embeddings": rope.get("original_max_position_embeddings", 4096),
            "beta_fast": rope.get("beta_fast", 32), "beta_slow": rope.get("beta_slow", 1),
            "mscale": rope.get("mscale", 1.0), "mscale_all_dim": rope.get("mscale_all_dim", 0.0)}


def hf_config(args: dict[str, Any], model_type: str) -> dict[str, Any]:
    need(args, "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "num_experts",
         "moe_ffn_hidden_size", "moe_router_topk")
    cfg = common_hf_config(args, model_type, "DeepseekV3ForCausalLM")
    freq = args.get("moe_layer_freq", 1)
    shared = args.get("moe_shared_expert_intermediate_size") or 0
    cfg.update({
        "q_lora_rank": args.get("q_lora_rank"), "kv_lora_rank": args["kv_lora_rank"],
        "qk_nope_head_dim": args["qk_head_dim"], "qk_rope_head_dim": args["qk_pos_emb_head_dim"],
        "v_head_dim": args["v_head_dim"], "num_key_value_heads": args["num_attention_heads"],
        "n_routed_experts": args["num_experts"], "moe_intermediate_size": args["moe_ffn_hidden_size"],
        "num_experts_per_tok": args["moe_router_topk"],
        "n_shared_experts": shared // args["moe_ffn_hidden_size"],
        "first_k_dense_replace": freq.index(1) if isinstance(freq, list) and 1 in freq else 0,
        "moe_layer_freq": 1, "norm_topk_prob": True,
        "routed_scaling_factor": args.get("moe_router_topk_scaling_factor") or 1.0,
        "n_group": args.get("moe_router_num_groups") or 1, "topk_group": args.get("moe_router_group_topk") or 1,
        "num_nextn_predict_layers": args.get("mtp_num_layers") or 0, "rope_interleave": True,
        "attention_bias": False,
    })
    if args.get("rope_type") == "yarn":
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": args["rotary_scaling_factor"],
                               "original_max_position_embeddings": args["original_max_position_embeddings"],
                               "beta_fast": args["beta_fast"], "beta_slow": args["beta_slow"],
                               "mscale": args["mscale"], "mscale_all_dim": args["mscale_all_dim"]}
    return cfg


FAMILY = Family(
    model_types=("deepseek_v3",),
    layer_map=layer_map,
    num_experts=num_experts,
    megatron_args=megatron_args,
    hf_config=hf_config,
)
