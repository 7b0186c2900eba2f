"""GGUF (llama.cpp) -> HF safetensors import for the Llama family: `llama`, `qwen2`, `qwen3`.

A GGUF file holds the weights (often block-quantised), the model hyper-parameters as metadata
and the tokenizer. We dequantise each tensor to float32 with the `gguf` package, rename it to
HF's name, undo llama.cpp's layout changes, and stream it into `save_hf_checkpoint`; the config
is rebuilt from the metadata and the tokenizer comes from `transformers`' GGUF tokenizer reader.

Layout facts this relies on:
- GGUF lists dims fastest-first (`[in, out]` for a linear weight); the `gguf` reader's numpy
  view and `dequantize` output are already in torch order `(out, in)`, so no transpose.
- llama.cpp's converter permutes the rows of Q and K (weight and bias) for arch `llama` only,
  so that each head's rotary pairs are interleaved `(x0, y0, x1, y1, ...)` instead of HF's
  halves `(x0, x1, ..., y0, y1, ...)`. We invert that per head (as transformers' GGUF loader
  does); `qwen2` and `qwen3` files keep HF's order and are not touched.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import AutoTokenizer

from miles_core.checkpoint.hf import save_hf_checkpoint
from miles_core.errors import MilesError

# GGUF `general.architecture` -> (HF model_type, HF architecture class). Exact keys only.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF file into a float32 HF directory at `out_dir` (written atomically)."""
    gguf_path = Path(gguf_path)
    reader = _open(gguf_path)
    arch = _architecture(reader, gguf_path)
    names = {tensor.name: _hf_name(tensor.name, gguf_path) for tensor in reader.tensors}
    config = _hf_config(reader, arch, set(names))
    with tempfile.TemporaryDirectory(prefix="miles-gguf-") as side:
        _save_tokenizer(gguf_path, Path(side), config)
        return save_hf_checkpoint(out_dir, _iter_hf_tensors(reader, arch, config, names), config,
                                  source_dir=side)


def _open(gguf_path: Path) -> Any:
    if not gguf_path.is_file():
        raise MilesError(f"GGUF file '{gguf_path}' does not exist")
    try:
        return GGUFReader(gguf_path)
    except (ValueError, OSError, IndexError) as err:
        # The reader raises bare numpy errors on truncated files; name the file instead.
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MilesError(f"cannot read GGUF file '{gguf_path}' (truncated or not GGUF): {reason}") from None


def _field(reader: Any, key: str, default: Any = ...) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise MilesError(f"GGUF metadata key '{key}' is missing")
        return default
    return field.contents()


def _architecture(reader: Any, gguf_path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise MilesError(f"GGUF architecture '{arch}' of '{gguf_path}' is not supported; "
                         f"expected one of: {', '.join(ARCHITECTURES)}")
    return arch


def _hf_name(gguf_name: str, gguf_path: Path) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if suffix in ("weight", "bias"):
        if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[parts[0]]}.{suffix}"
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
            return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise MilesError(f"GGUF tensor '{gguf_name}' in '{gguf_path}' has no HF equivalent "
                     f"for this importer (llama/qwen2/qwen3 dense layers only)")


def _float32_text(value: float) -> float:
    """GGUF stores floats as float32; `1e-05` reads back as 9.99999974e-06. Keep the short
    decimal the model was configured with."""
    return float(str(np.float32(value)))


def _hf_config(reader: Any, arch: str, tensor_names: set[str]) -> dict[str, Any]:
    """A HF `config.json` dict from GGUF metadata (llama.cpp's `<arch>.*` keys)."""
    model_type, architecture = ARCHITECTURES[arch]

    def meta(key: str, default: Any = ...) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    num_heads = meta("attention.head_count")
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": _vocab_size(reader),
        "hidden_size": meta("embedding_length"),
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta("attention.head_count_kv", num_heads),
        "rms_norm_eps": _float32_text(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_text(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": meta("context_length"),
        "hidden_act": "silu",
        # llama.cpp writes `output.weight` only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    if (head_dim := meta("attention.key_length", None)) is not None:
        config["head_dim"] = head_dim
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    config.update(_rope_scaling(meta))
    config.update(_special_token_ids(reader))
    return config


def _vocab_size(reader: Any) -> int:
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])  # GGUF dims are [hidden, vocab]
    raise MilesError("GGUF file has no 'token_embd.weight' tensor")


def _rope_scaling(meta: Callable[..., Any]) -> dict[str, Any]:
    kind = meta("rope.scaling.type", "none")
    if kind == "none":
        return {}
    if kind == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": meta("rope.scaling.factor")}}
    raise MilesError(f"GGUF rope scaling '{kind}' is not supported; expected none or linear")


def _special_token_ids(reader: Any) -> dict[str, int]:
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
            "pad_token_id": "padding_token_id"}
    ids = {hf: _field(reader, f"tokenizer.ggml.{gguf}", None) for hf, gguf in keys.items()}
    return {key: value for key, value in ids.items() if value is not None}


def _iter_hf_tensors(reader: Any, arch: str, config: dict[str, Any],
                     names: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantise one tensor at a time, in file order, as (HF name, float32 tensor)."""
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        if arch == "llama":
            values = _unpermute_qk(tensor.name, values, config)
        # `np.array` copies: F32 tensors come back as read-only views of the memory-mapped file.
        yield names[tensor.name], torch.from_numpy(np.array(values, dtype=np.float32))


def _unpermute_qk(gguf_name: str, values: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of Q/K weights and biases (arch llama)."""
    if ".attn_q." in gguf_name:
        return unpermute_rotary(values, config["num_attention_heads"])
    if ".attn_k." in gguf_name:
        return unpermute_rotary(values, config["num_key_value_heads"])
    return values


def permute_rotary(values: np.ndarray, num_heads: int) -> np.ndarray:
    """HF -> llama.cpp row order: per head, halves `(x.., y..)` become pairs `(x0, y0, ...)`."""
    rows = values.shape[0]
    return values.reshape(num_heads, 2, rows // num_heads // 2, *values.shape[1:]) \
        .swapaxes(1, 2).reshape(values.shape)


def unpermute_rotary(values: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp -> HF row order; the inverse of `permute_rotary`."""
    rows = values.shape[0]
    return values.reshape(num_heads, rows // num_heads // 2, 2, *values.shape[1:]) \
        .swapaxes(1, 2).reshape(values.shape)


def _save_tokenizer(gguf_path: Path, out_dir: Path, config: dict[str, Any]) -> None:
    """Tokenizer files (chat template included) and `generation_config.json` into `out_dir`."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError) as err:
        raise MilesError(f"cannot build a tokenizer from GGUF file '{gguf_path}': {err}") from None
    tokenizer.save_pretrained(str(out_dir))
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if key in config}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n",
                                                    encoding="utf-8")
