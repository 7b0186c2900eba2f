"""megatron-core on CPU for the interop tests: patches, a one-process group, and `GPTModel`s built
from a HF config with megatron-core's own local layer specs.

CPU patches (megatron-core 0.16, torch CPU build): `torch.cuda.current_device` -> "cpu",
`torch.cuda.synchronize` no-op, the model-parallel CUDA RNG tracker's `fork` -> no-op (dropout
is 0), `moe_utils.te_general_gemm` defined as None, and `multi_latent_attention.HAVE_TE` set
False (its TE import "succeeds" with `TELinear = None` when Transformer Engine is absent).

Two stand-ins for Transformer Engine, neither of which holds weights:
- key names: the local spec names MoE pre-MLP norms `mlp.linear_fc1.layer_norm_weight` and MLA
  q/kv norms `self_attention.q_layernorm` / `kv_layernorm`; `te_names=True` sets each layer's
  `sharded_state_dict_keys_map` to what the Transformer Engine spec writes instead;
- MLA core attention: the local `DotProductAttention` rejects MLA's k/v head dims (TypeError
  "unexpected keyword argument 'k_channels'"), so MLA layers use `SDPAttention` below: causal
  softmax attention with megatron's softmax scale, in megatron's [s, b, h, d] layout.
Every weighted module (projections, norms, router, experts, MTP) is megatron-core's own.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from miles_core.checkpoint.mapping.base import rope_theta


@contextlib.contextmanager
def megatron_on_cpu(tmp_dir: Path):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "current_device", lambda: "cpu")
        mp.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        mp.setattr(moe_utils, "te_general_gemm", None, raising=False)
        mp.setattr(multi_latent_attention, "HAVE_TE", False)
        mp.setattr(mp_random.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())
        dist.init_process_group("gloo", init_method=f"file://{tmp_dir / 'store'}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


class SDPAttention(torch.nn.Module):
    """Core attention for MLA layers (no weights): softmax(q k^T * scale + causal) v."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None,
                 k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None, **kwargs):
        super().__init__()
        self.scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, packed_seq_params=None, **kwargs):
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, h, d] -> [b, h, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def transformer_config(cfg: dict):
    """megatron-core's config for a HF config, written out by hand (independent of the converter)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    common = dict(num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
                  ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=cfg["num_attention_heads"],
                  normalization="RMSNorm", layernorm_epsilon=cfg["rms_norm_eps"], gated_linear_unit=True,
                  activation_func=F.silu, add_bias_linear=False, use_cpu_initialization=True,
                  params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0)
    if cfg["model_type"] == "deepseek_v3":
        n = cfg["num_hidden_layers"]
        return MLATransformerConfig(
            **common, q_lora_rank=cfg["q_lora_rank"], kv_lora_rank=cfg["kv_lora_rank"],
            qk_head_dim=cfg["qk_nope_head_dim"], qk_pos_emb_head_dim=cfg["qk_rope_head_dim"],
            v_head_dim=cfg["v_head_dim"], rope_type="rope", rotary_base=rope_theta(cfg), qk_layernorm=True,
            num_moe_experts=cfg["n_routed_experts"], moe_router_topk=cfg["num_experts_per_tok"],
            moe_ffn_hidden_size=cfg["moe_intermediate_size"],
            moe_shared_expert_intermediate_size=cfg["n_shared_experts"] * cfg["moe_intermediate_size"],
            moe_layer_freq=[int(i >= cfg["first_k_dense_replace"]) for i in range(n)],
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_router_topk_scaling_factor=cfg["routed_scaling_factor"], moe_router_num_groups=cfg["n_group"],
            moe_router_group_topk=cfg["topk_group"], moe_token_dispatcher_type="allgather",
            moe_router_load_balancing_type="none", mtp_num_layers=cfg.get("num_nextn_predict_layers") or None)
    moe = {}
    if cfg["model_type"] == "qwen3_moe":
        moe = dict(num_moe_experts=cfg.get("num_experts") or cfg["num_local_experts"], moe_router_topk=cfg["num_experts_per_tok"],
                   moe_ffn_hidden_size=cfg["moe_intermediate_size"], moe_router_pre_softmax=not cfg["norm_topk_prob"],
                   moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none")
    return TransformerConfig(**common, **moe, num_query_groups=cfg["num_key_value_heads"], kv_channels=cfg["head_dim"],
                             add_qkv_bias=cfg["model_type"] == "qwen2", qk_layernorm=cfg["model_type"].startswith("qwen3"))


def build_gpt(cfg: dict, *, te_names: bool = True, seed: int = 0):
    """A megatron-core GPTModel matching `cfg` (MTP layers from `num_nextn_predict_layers`)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    torch.manual_seed(seed)
    config = transformer_config(cfg)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    for spec in block.layer_specs:
        mla = config.multi_latent_attention
        if mla:
            spec.submodules.self_attention.submodules.core_attention = SDPAttention
        if te_names:
            spec.submodules.sharded_state_dict_keys_map = _te_keys(mla, spec.submodules.mlp.submodules)
    mtp = get_gpt_mtp_block_spec(config, block.layer_specs[-1], use_transformer_engine=False) \
        if config.mtp_num_layers else None
    return GPTModel(config=config, transformer_layer_spec=block, vocab_size=cfg["vocab_size"],
                    max_sequence_length=cfg["max_position_embeddings"], position_embedding_type="rope",
                    rotary_base=rope_theta(cfg), share_embeddings_and_output_weights=cfg.get("tie_word_embeddings", False),
                    mtp_block_spec=mtp).eval()


def _te_keys(mla: bool, mlp_submodules) -> dict[str, str]:
    """The names the Transformer Engine spec gives the norms the local spec keeps separate."""
    moe = hasattr(mlp_submodules, "experts")
    keys = {} if mla else {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    if mla:
        keys.update({"self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
                     "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_"})
    if not moe:
        keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return keys


def randomize(model, seed: int = 1) -> None:
    """Random weights everywhere (norms near 1), including the router's expert bias buffer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name or name.endswith("layer_norm_weight"):
                tensor.uniform_(0.5, 1.5, generator=generator)
            elif name.endswith(("weight", "bias")) or "expert_bias" in name:
                tensor.normal_(0.0, 0.1, generator=generator)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Main-model logits (B, T, V); MTP heads are not run."""
    seq = ids.shape[1]
    positions = torch.arange(seq).expand_as(ids)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    saved = model.mtp_process, model.config.mtp_num_layers
    model.mtp_process, model.config.mtp_num_layers = False, None
    try:
        with torch.no_grad():
            return model(ids, positions, attention_mask=mask).float()
    finally:
        model.mtp_process, model.config.mtp_num_layers = saved


def load(model, folder: Path) -> None:
    """Load a torch_dist checkpoint through megatron-core's dist_checkpointing, strictly."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(state["model"], strict=True)


def save(model, root: Path, iteration: int, args: dict) -> Path:
    """Save as megatron's training loop does: ROOT/iter_N/ + tracker, args in common.pt."""
    from megatron.core import dist_checkpointing

    folder = root / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    state = {"args": argparse.Namespace(**args), "checkpoint_version": 3.0, "iteration": iteration,
             "model": model.sharded_state_dict()}
    dist_checkpointing.save(state, str(folder))
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return folder


def training_args(cfg: dict) -> dict:
    """The model arguments megatron's training loop would store for `cfg`, read off megatron's
    own config object (argument names as megatron's parser spells them)."""
    c = transformer_config(cfg)
    args = dict(num_layers=c.num_layers, hidden_size=c.hidden_size, ffn_hidden_size=c.ffn_hidden_size,
                num_attention_heads=c.num_attention_heads, num_query_groups=c.num_query_groups,
                kv_channels=c.kv_channels, padded_vocab_size=cfg["vocab_size"],
                max_position_embeddings=cfg["max_position_embeddings"], norm_epsilon=c.layernorm_epsilon,
                rotary_base=rope_theta(cfg), normalization="RMSNorm", swiglu=True,
                untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
                add_qkv_bias=c.add_qkv_bias, qk_layernorm=c.qk_layernorm, num_experts=c.num_moe_experts,
                moe_ffn_hidden_size=c.moe_ffn_hidden_size, moe_router_topk=c.moe_router_topk,
                moe_router_pre_softmax=c.moe_router_pre_softmax, moe_layer_freq=c.moe_layer_freq,
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1, ckpt_format="torch_dist")
    if c.multi_latent_attention:
        args.update(multi_latent_attention=True, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
                    qk_head_dim=c.qk_head_dim, qk_pos_emb_head_dim=c.qk_pos_emb_head_dim, v_head_dim=c.v_head_dim,
                    moe_shared_expert_intermediate_size=c.moe_shared_expert_intermediate_size,
                    moe_router_topk_scaling_factor=c.moe_router_topk_scaling_factor,
                    moe_router_num_groups=c.moe_router_num_groups, moe_router_group_topk=c.moe_router_group_topk,
                    moe_router_score_function=c.moe_router_score_function, mtp_num_layers=c.mtp_num_layers,
                    rope_type=c.rope_type)
    return args
