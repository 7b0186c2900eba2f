"""Tiny random HF checkpoints of every convertible family, built once per session.

Every parameter (and the DeepSeek router's selection bias) is random, norms near 1, so a
swapped, mis-fused or mis-split tensor changes numbers. DeepSeek-V3's MTP layer is written by
hand: transformers drops `model.layers.{num_layers + k}` when it loads or saves a model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from miles_core.checkpoint.hf import iter_state_dict, read_hf_config, save_hf_checkpoint

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            rms_norm_eps=1e-6, rope_theta=10000.0)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
DEEPSEEK = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                num_key_value_heads=4)
FAMILIES = {
    "llama": ("llama", dict(tie_word_embeddings=True)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", MOE),
    "deepseek_v3": ("deepseek_v3", DEEPSEEK),
    "deepseek_v3_no_q_lora": ("deepseek_v3", {**DEEPSEEK, "q_lora_rank": None}),
}


def randomize(named: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, tensor in named.items():
            if not tensor.is_floating_point():
                continue
            if "norm" in name:
                tensor.uniform_(0.5, 1.5, generator=generator)
            else:
                tensor.normal_(0.0, 0.1, generator=generator)


def write_tiny_hf(out_dir: Path, model_type: str, overrides: dict, mtp_layers: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    if model_type == "deepseek_v3":
        config.num_nextn_predict_layers = 0  # transformers builds no MTP layer; added below
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(0)
    randomize(dict(model.state_dict()), generator)
    model.save_pretrained(out_dir)  # per-expert tensors, as released checkpoints store them
    if mtp_layers:
        tensors = dict(iter_state_dict(out_dir))
        cfg = {**read_hf_config(out_dir), "num_nextn_predict_layers": mtp_layers}
        tensors.update(mtp_tensors(tensors, cfg, mtp_layers, generator))
        shutil.rmtree(out_dir)
        save_hf_checkpoint(out_dir, tensors.items(), cfg)
    return out_dir


def mtp_tensors(tensors: dict[str, torch.Tensor], cfg: dict, num: int, generator: torch.Generator) -> dict:
    """DeepSeek-style MTP layers: a fresh copy of the last decoder layer's tensors plus enorm,
    hnorm, eh_proj, shared_head.norm and copies of the embedding and the output head."""
    n, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    last = f"model.layers.{n - 1}."
    out = {}
    for k in range(num):
        prefix = f"model.layers.{n + k}."
        layer = {prefix + name[len(last):]: t.clone() for name, t in tensors.items() if name.startswith(last)}
        layer.update({prefix + "enorm.weight": torch.empty(hidden), prefix + "hnorm.weight": torch.empty(hidden),
                      prefix + "eh_proj.weight": torch.empty(hidden, 2 * hidden),
                      prefix + "shared_head.norm.weight": torch.empty(hidden)})
        randomize(layer, generator)
        layer[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        layer[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
        out.update(layer)
    return out


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """name -> HF directory; DeepSeek-V3 carries one MTP layer."""
    root = tmp_path_factory.mktemp("tiny-hf")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            model_type, overrides = FAMILIES[name]
            mtp = 1 if name == "deepseek_v3" else 0
            cache[name] = write_tiny_hf(root / name, model_type, overrides, mtp)
        return cache[name]

    return get
