"""Multi-latent attention (DeepSeek-V3) for the megatron trainer's `GPTModel`: megatron-core's
`MLATransformerConfig` for a HF config, and the core attention its local layer spec lacks.

megatron-core's MLA (`MLASelfAttention`: q/kv down and up projections, their norms, the split
RoPE) is used as is. Only the core attention (softmax(q k^T * scale) v) is ours when Transformer
Engine is absent: the local spec's `DotProductAttention` takes one head dim for q, k and v, while
MLA's q/k heads are `qk_nope_head_dim + qk_rope_head_dim` wide and its v heads `v_head_dim`.
`SDPACoreAttention` takes megatron's core-attention constructor and call arguments and runs
`torch.nn.functional.scaled_dot_product_attention`, causal, with the scale MLA computes. Under
context parallelism `megatron_context.ContextParallelAttention` replaces it (it takes the same
arguments and keeps k's and v's head dims apart).

Tensor parallelism: the up projections (`linear_q_up_proj`, `linear_kv_up_proj`) are
column-parallel and `linear_proj` row-parallel, split by heads as megatron-core builds them. The
down projections (`linear_q_down_proj`, `linear_kv_down_proj`) and the q/kv norms on their
outputs are replicated on every TP rank, as the Transformer Engine spec builds them
(`TELinear`, "duplicated"): the local spec makes the down projections column-parallel, and then
megatron-core gathers their outputs without summing the gradient of the shared RoPE key part
(`k_pos_emb`, used by every rank's heads) over the TP ranks, so the rank holding those columns
would train on its own heads' share only. `use_local_spec` puts megatron-core's own replicated
linear (`post_training.modelopt.layers.Linear`, which MLA accepts) there instead. megatron-core
trains MLA tensor-parallel with sequence parallelism (MoE layers need it: enforced by
`megatron_model.check_model_parallel`), where every replicated piece sees 1/TP of the tokens:
the down projections' weights (megatron marks them `sequence_parallel`) and the q/kv norms
(`megatron_model.SequenceParallelRMSNorm`) have their gradients summed over the TP group, and
the RoPE key part is gathered over the sequence (its gradient reduce-scattered: summed over
every rank's heads) by megatron-core.

Not built: MTP layers (`num_nextn_predict_layers`; the trainer's loss does not use them, as in
the native trainer, and their HF weights pass through `export_weights` unchanged) and YaRN RoPE
(refused by `megatron_model.hf_config_of`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.checkpoint.mapping.base import Heads
from miles_core.errors import MilesError


def check_causal_without_dropout(name: str, config, attn_mask_type, attention_dropout: float | None) -> None:
    """Refuse what our core attentions do not compute (they replace megatron's in the layer spec):
    a non-causal mask or attention dropout."""
    from megatron.core.transformer.enums import AttnMaskType

    if attn_mask_type != AttnMaskType.causal:
        raise MilesError(f"the {name} core attention is causal only, got mask type {attn_mask_type}")
    dropout = config.attention_dropout if attention_dropout is None else attention_dropout
    if dropout:
        raise MilesError(f"the {name} core attention has no dropout, got attention_dropout {dropout}")


class SDPACoreAttention(nn.Module):
    """Causal attention over [s, b, heads, dim] q/k/v with different q/k and v head dims."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, cp_comm_type: str | None = None,
                 pg_collection=None) -> None:
        super().__init__()
        check_causal_without_dropout("MLA", config, attn_mask_type, attention_dropout)
        self.softmax_scale = softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise MilesError("the MLA core attention takes no packed sequences or attention bias")
        # [s, b, h, d] -> [b, h, s, d]; right padding sits after every real token, so the causal
        # mask alone keeps real positions from attending to it.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out_BHSD = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        S, B = query.shape[:2]
        return out_BHSD.permute(2, 0, 1, 3).reshape(S, B, -1)  # megatron's [s, b, h * v_dim]


def mla_config_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """`MLATransformerConfig` fields of a deepseek_v3 HF config beyond the common ones (MLA, and
    the sigmoid-scored, group-limited, bias-selected router with shared experts)."""
    num_layers = cfg["num_hidden_layers"]
    return dict(
        multi_latent_attention=True, q_lora_rank=cfg["q_lora_rank"], kv_lora_rank=cfg["kv_lora_rank"],
        qk_head_dim=cfg["qk_nope_head_dim"], qk_pos_emb_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"], rope_type="rope", rotary_base=cfg["rope_theta"],
        num_moe_experts=cfg["n_routed_experts"], moe_router_topk=cfg["num_experts_per_tok"],
        moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=(cfg["n_shared_experts"] or 0) * cfg["moe_intermediate_size"] or None,
        moe_layer_freq=[int(i >= cfg["first_k_dense_replace"]) for i in range(num_layers)],
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.0,
        moe_router_topk_scaling_factor=cfg["routed_scaling_factor"], moe_router_num_groups=cfg["n_group"],
        moe_router_group_topk=cfg["topk_group"], moe_router_pre_softmax=True,
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32")  # router logits in fp32 under bf16 compute, as HF and the native model


def mla_heads(cfg: dict[str, Any]) -> Heads:
    """MLA's heads: one KV group per head, q/k heads `qk_nope_head_dim + qk_rope_head_dim` wide
    (megatron's `kv_channels`; MLA takes the v width from `v_head_dim`)."""
    heads = cfg["num_attention_heads"]
    return Heads(heads, heads, cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"])


def check_mla(cfg: dict[str, Any]) -> None:
    """Refuse the deepseek_v3 variants megatron's MLA (as built here) does not compute like HF."""
    if not cfg.get("norm_topk_prob", True):
        raise MilesError("train.backend = 'megatron' needs deepseek_v3 norm_topk_prob = true (megatron-core "
                         "always normalises the sigmoid top-k weights)")
    if not cfg.get("rope_interleave", True):
        raise MilesError("train.backend = 'megatron' needs deepseek_v3 rope_interleave = true (megatron-core's "
                         "MLA RoPE)")
    groups, topk = cfg.get("topk_group") or 1, cfg["num_experts_per_tok"]
    if (cfg.get("n_group") or 1) > 1 and topk // groups != 2:
        raise MilesError(f"train.backend = 'megatron' needs deepseek_v3 num_experts_per_tok // topk_group = 2 "
                         f"(megatron-core scores a group by its top num_experts_per_tok // topk_group experts, "
                         f"DeepSeek by its top 2), got {topk} // {groups}")
    if not cfg.get("q_lora_rank"):
        raise MilesError("train.backend = 'megatron' does not support deepseek_v3 without q LoRA "
                         "(q_lora_rank = null) yet; expected a q_lora_rank")


def use_local_spec(block_spec) -> None:
    """Put `SDPACoreAttention` and the replicated down projections (module docstring) in every
    MLA layer of a local block spec (in place)."""
    from megatron.core.post_training.modelopt.layers import Linear

    for layer in block_spec.layer_specs:
        attention = layer.submodules.self_attention.submodules
        attention.core_attention = SDPACoreAttention
        attention.linear_q_down_proj = attention.linear_kv_down_proj = Linear
