"""Fixtures for checkpoint tests: tiny seeded `transformers` models and GGUF files written the
way llama.cpp's converter writes them (names, Q/K row permutation for llama, F32 norms)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize
from transformers.convert_slow_tokenizer import bytes_to_unicode

from miles_core.checkpoint.gguf import permute_rotary

TEST_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test bot.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e"]
TOKENS = SPECIALS + list(bytes_to_unicode().values()) + ["Ġt", "he"]

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def tiny_hf_model(model_type: str, **overrides) -> torch.nn.Module:
    """A 2-layer GQA model with every parameter random (norms near 1, biases non-zero), so a
    swapped or mis-permuted tensor changes the numbers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config = AutoConfig.for_model(model_type, **{**kwargs, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.05)
    return model


def gguf_name(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{suffix}"
    layer, leaf = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem).groups()
    return f"blk.{layer}.{_BLOCK[leaf]}.{suffix}"


def llama_cpp_tensor(arch: str, hf_name: str, tensor: torch.Tensor, config) -> np.ndarray:
    """What llama.cpp's converter stores for a HF tensor before quantisation."""
    values = tensor.detach().float().numpy()
    if arch == "llama" and ".q_proj." in hf_name:
        values = permute_rotary(values, config.num_attention_heads)
    if arch == "llama" and ".k_proj." in hf_name:
        values = permute_rotary(values, config.num_key_value_heads)
    return values


def _add_metadata(writer: GGUFWriter, config) -> None:
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    # llama.cpp states the head size only when the HF config does (Qwen2's does not).
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim or config.hidden_size // config.num_attention_heads)


def _add_tokenizer(writer: GGUFWriter) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    num_normal = len(TOKENS) - len(SPECIALS)
    writer.add_token_types([TokenType.CONTROL] * len(SPECIALS) + [TokenType.NORMAL] * num_normal)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEST_CHAT_TEMPLATE)


def write_gguf(model, path: Path, arch: str, qtype: GGMLQuantizationType = GGMLQuantizationType.F32) -> Path:
    """Write `model` as llama.cpp would: 1-D tensors F32, matrices in `qtype`."""
    config = model.config
    writer = GGUFWriter(path, arch)
    _add_metadata(writer, config)
    _add_tokenizer(writer)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = llama_cpp_tensor(arch, hf_name, tensor, config)
        if values.ndim == 2 and qtype != GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(hf_name), quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(hf_name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def miles_cache(tmp_path, monkeypatch) -> Path:
    """A private cache root, so generated models never touch the user's cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MILES_CACHE", str(root))
    return root


@pytest.fixture
def make_hf_model():
    """Factory: `make_hf_model("llama", tie_word_embeddings=True)` -> seeded tiny HF model."""
    return tiny_hf_model


@pytest.fixture
def make_gguf():
    """Factory: `make_gguf(model, path, arch, qtype)` -> path of a llama.cpp-style GGUF."""
    return write_gguf
