"""DeepSeek-V3 / R1 (`transformers` DeepseekV3ForCausalLM; arXiv 2412.19437).

Every layer uses Multi-head Latent Attention (`mla.py`, YaRN RoPE on the decoupled rope dims).
The first `first_k_dense_replace` layers have a dense SwiGLU MLP; the others a MoE block with
`n_routed_experts` routed experts (sigmoid router, selection-only `e_score_correction_bias`,
group-limited top-k over `n_group` / `topk_group`, `routed_scaling_factor`) plus
`n_shared_experts` always-on shared experts, fused into one MLP of
n_shared_experts * moe_intermediate_size, as HF stores them. Parameter names are HF's.

MoE layer indices: the MoE layers of the main stack, in model order, are MoE layers
0..num_moe_layers-1 (decoder layer first_k_dense_replace + i); that is their key in a
`RoutingContext`. Dense layers have no entry.

Multi-token prediction (MTP): checkpoints with `num_nextn_predict_layers` = n > 0 carry n extra
layers `model.layers.{num_hidden_layers + k}` (a full MoE decoder layer plus `embed_tokens`,
`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, `shared_head.head`). transformers drops them;
we hold them under those names so they load and save unchanged, e.g. for an MTP draft model.
Their forward is not wired: `forward` runs the main stack only, so MTP MoE layers are not
counted in `num_moe_layers` (their MoE blocks carry indices num_moe_layers + k).

Router precision: HF keeps `mlp.gate.weight` and `e_score_correction_bias` in fp32 whatever the
model dtype (`_keep_in_fp32_modules_strict`); `keep_in_fp32` tells our loader to do the same.

Shape legend: B batch, T tokens, E hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from miles_core.errors import MilesError
from miles_core.models.base import CausalLM
from miles_core.models.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding, hf_common_args
from miles_core.models.mla import MLAttention
from miles_core.models.moe import MoEDecoderLayer, RouterArgs, SparseMoE

# What transformers implements (and DeepSeek-V3 uses); other values only exist in remote code.
_SUPPORTED = {"hidden_act": "silu", "scoring_func": "sigmoid", "topk_method": "noaux_tc"}


@dataclass(frozen=True)
class DeepseekV3Args:
    """Model hyper-parameters, read from a HF `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    rope_interleave: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    num_nextn_predict_layers: int

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> DeepseekV3Args:
        for key, expected in _SUPPORTED.items():
            if cfg.get(key, expected) != expected:
                raise MilesError(f"deepseek_v3 {key} '{cfg[key]}' is not supported; expected {expected}")
        return cls(
            **hf_common_args(cfg),
            moe_intermediate_size=cfg["moe_intermediate_size"],
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=cfg["kv_lora_rank"],
            qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            rope_interleave=cfg.get("rope_interleave", True),
            n_routed_experts=cfg.get("n_routed_experts", cfg.get("num_local_experts", 256)),
            num_experts_per_tok=cfg["num_experts_per_tok"],
            n_shared_experts=cfg.get("n_shared_experts") or 0,
            n_group=cfg.get("n_group") or 1,
            topk_group=cfg.get("topk_group") or 1,
            routed_scaling_factor=cfg.get("routed_scaling_factor", 1.0),
            norm_topk_prob=cfg.get("norm_topk_prob", True),
            first_k_dense_replace=cfg.get("first_k_dense_replace", 0),
            # transformers 5 aliases it `num_mtp_layers`; its default is 1, as in DeepSeek-V3.
            num_nextn_predict_layers=cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 1)),
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Decoder layer index of each MoE layer of the main stack, in model order."""
        return tuple(range(self.first_k_dense_replace, self.num_hidden_layers))


def _mlp(args: DeepseekV3Args, layer_idx: int) -> nn.Module:
    if layer_idx < args.first_k_dense_replace:
        return GatedMLP(args.hidden_size, args.intermediate_size)
    router = RouterArgs(num_experts=args.n_routed_experts, top_k=args.num_experts_per_tok,
                        scoring="sigmoid", norm_topk_prob=args.norm_topk_prob, n_group=args.n_group,
                        topk_group=args.topk_group, routed_scaling_factor=args.routed_scaling_factor)
    return SparseMoE(hidden_size=args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
                     router=router, moe_index=layer_idx - args.first_k_dense_replace,
                     shared_intermediate_size=args.moe_intermediate_size * args.n_shared_experts)


def _decoder_layer(args: DeepseekV3Args, layer_idx: int) -> MoEDecoderLayer:
    return MoEDecoderLayer(MLAttention(args, layer_idx), _mlp(args, layer_idx), args.hidden_size,
                           args.rms_norm_eps)


class SharedHead(nn.Module):
    """The MTP layer's own output norm and head (`shared_head.norm`, `shared_head.head`)."""

    def __init__(self, args: DeepseekV3Args) -> None:
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.head = Linear(args.hidden_size, args.vocab_size, bias=False)


class DeepseekV3MTPLayer(MoEDecoderLayer):
    """MTP module k, stored as decoder layer num_hidden_layers + k: the decoder block of its
    parent class plus the projections that feed it. Held for loading and saving only."""

    def __init__(self, args: DeepseekV3Args, layer_idx: int) -> None:
        super().__init__(MLAttention(args, layer_idx), _mlp(args, layer_idx), args.hidden_size,
                         args.rms_norm_eps)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = Linear(2 * args.hidden_size, args.hidden_size, bias=False)
        self.shared_head = SharedHead(args)


class DeepseekV3Model(nn.Module):
    def __init__(self, args: DeepseekV3Args) -> None:
        super().__init__()
        self.num_hidden_layers = args.num_hidden_layers
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        main = [_decoder_layer(args, i) for i in range(args.num_hidden_layers)]
        mtp = [DeepseekV3MTPLayer(args, args.num_hidden_layers + k) for k in range(args.num_nextn_predict_layers)]
        self.layers = nn.ModuleList(main + mtp)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.qk_rope_head_dim, args.rope_theta, args.rope_scaling)

    def forward(self, input_ids_BT, position_ids_BT, kv_cache=None, routing=None):
        x_BTE = self.embed_tokens(input_ids_BT)
        rope = self.rotary_emb(position_ids_BT, x_BTE.dtype)
        for layer in self.layers[: self.num_hidden_layers]:  # MTP layers are not part of the LM
            x_BTE = layer(x_BTE, rope, position_ids_BT, kv_cache, routing)
        return self.norm(x_BTE)


class DeepseekV3ForCausalLM(CausalLM):
    # Name suffixes the loader keeps in fp32 whatever the model dtype (HF does the same).
    keep_in_fp32: tuple[str, ...] = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")

    def __init__(self, args: DeepseekV3Args) -> None:
        super().__init__(args, DeepseekV3Model(args))

    def kv_cache_dims(self) -> tuple[int, int, int]:
        """MLA caches per-head k (qk_nope + qk_rope dims) and v (v_head_dim) of the main stack."""
        args = self.args
        return args.num_attention_heads, args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim
