"""The Llama family: Llama 3/3.1, Qwen2/2.5, Qwen3 and SmolLM2 share one definition.

The differences are flags read from the HF config: q/k/v bias (Qwen2), per-head q/k RMSNorm
(Qwen3), Llama 3.1 RoPE scaling, tied embeddings (SmolLM2, small Qwen). Module and parameter
names are HF's, so a HF state dict loads without renaming.

Shape legend: B batch, T tokens, E hidden size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from miles_core.models.base import CausalLM
from miles_core.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding, hf_common_args, hf_gqa_args


@dataclass(frozen=True)
class LlamaArgs:
    """Model hyper-parameters, read from a HF `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
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
    qk_norm: bool

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> LlamaArgs:
        args = hf_common_args(cfg) | hf_gqa_args(cfg)
        # Qwen2 always has q/k/v bias and no flag for it; Llama and Qwen3 read the flag.
        if cfg["model_type"] == "qwen2":
            args["attention_bias"] = True
        return cls(**args, qk_norm=cfg["model_type"] == "qwen3")


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(
            hidden_size=args.hidden_size, num_heads=args.num_attention_heads,
            num_kv_heads=args.num_key_value_heads, head_dim=args.head_dim,
            qkv_bias=args.attention_bias, qk_norm=args.qk_norm, norm_eps=args.rms_norm_eps,
            layer_idx=layer_idx,
        )
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size)

    def forward(self, x_BTE, rope, position_ids_BT, kv_cache):
        x_BTE = x_BTE + self.self_attn(self.input_layernorm(x_BTE), rope, position_ids_BT, kv_cache)
        return x_BTE + self.mlp(self.post_attention_layernorm(x_BTE))


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling)

    def forward(self, input_ids_BT, position_ids_BT, kv_cache=None, routing=None):  # dense: no routing
        x_BTE = self.embed_tokens(input_ids_BT)
        rope = self.rotary_emb(position_ids_BT, x_BTE.dtype)
        for layer in self.layers:
            x_BTE = layer(x_BTE, rope, position_ids_BT, kv_cache)
        return self.norm(x_BTE)


class LlamaForCausalLM(CausalLM):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__(args, LlamaModel(args))
