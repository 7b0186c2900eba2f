"""Tiny random models of every family, built from `transformers`-style configs.

They are the test fixtures of the whole project (engine, trainer, conversion, alignment): small
enough for CPU tests in seconds, with the structure of the real families (GQA, q/k norms, MoE
routers with selection biases, MLA, MTP layers). `checkpoint/sources.py` writes them out as HF
checkpoints with a byte-level tokenizer under the built-in names `tiny-qwen3`, `tiny-qwen3-moe`
and `tiny-deepseek-v3`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from miles_core.models.layers import RMSNorm
from miles_core.models.registry import build_model

TINY_QWEN3_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
    "pad_token_id": 256,
    "eos_token_id": 258,
}
_TINY_MOE_BASE: dict[str, Any] = {
    key: TINY_QWEN3_CONFIG[key] for key in ("vocab_size", "hidden_size", "max_position_embeddings", "rms_norm_eps",
                                            "rope_theta", "tie_word_embeddings", "hidden_act", "torch_dtype",
                                            "pad_token_id", "eos_token_id")
}
TINY_QWEN3_MOE_CONFIG: dict[str, Any] = {
    **_TINY_MOE_BASE, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
}
TINY_DEEPSEEK_V3_CONFIG: dict[str, Any] = {
    **_TINY_MOE_BASE, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128,
    "moe_intermediate_size": 32, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
    "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "first_k_dense_replace": 1, "num_nextn_predict_layers": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
}


def tiny_model(config: dict[str, Any]) -> nn.Module:
    """N(0, 0.02) linear and embedding weights, unit norms, zero biases; MoE routers N(0, 0.5)
    and selection biases N(0, 0.05) so routing is far from uniform. Seed 0, own generator so
    the caller's global RNG is left alone."""
    generator = torch.Generator().manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.5 if name.endswith("mlp.gate") else 0.02, generator=generator)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if getattr(module, "e_score_correction_bias", None) is not None:
                module.e_score_correction_bias.normal_(0.0, 0.05, generator=generator)
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        # DeepSeek-V3's MTP layers hold copies of the main embedding and output layer (Megatron
        # shares them), so the tiny model's copies equal the main ones too.
        for name, param in model.named_parameters():
            if name.endswith(".embed_tokens.weight") and name != "model.embed_tokens.weight":
                param.copy_(model.model.embed_tokens.weight)
            if name.endswith(".shared_head.head.weight"):
                param.copy_(model.lm_head.weight)
    return model
