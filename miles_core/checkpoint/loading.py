"""Model source -> ready native model + tokenizer + the runtime facts the engine needs.

`ModelConfig` is what the user asked for; `LoadedModel` is runtime state (the directory the
source resolved to, the device actually chosen, eos ids gathered from every place HF keeps them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from miles_core.checkpoint.hf import load_weights_into, read_hf_config
from miles_core.checkpoint.sources import resolve_model_source
from miles_core.config import ModelConfig
from miles_core.errors import MilesError
from miles_core.kernels import set_alignment_mode
from miles_core.models.registry import build_model
from miles_core.quant.formats import dense_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    hf_config: dict[str, Any]
    path: Path
    device: torch.device
    eos_token_ids: frozenset[int]

    @property
    def max_position_embeddings(self) -> int:
        return int(self.hf_config.get("max_position_embeddings", 4096))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MilesError(f"model.device is '{name}' but CUDA is not available; use 'cpu' or 'auto'")
    return device


# Without any of these, transformers builds an empty tokenizer from config.json's model_type.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: Path):
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise MilesError(f"no tokenizer in '{path}': expected one of {', '.join(TOKENIZER_FILES)} next to "
                         "config.json (copy the tokenizer files of the base model there)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise MilesError(f"cannot load the tokenizer from '{path}': {str(err).splitlines()[0]}") from None
    if len(tokenizer) <= 1:
        raise MilesError(f"the tokenizer loaded from '{path}' is empty ({len(tokenizer)} token); expected the "
                         f"model's tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return tokenizer


def eos_token_ids(path: Path, hf_config: dict[str, Any], tokenizer) -> frozenset[int]:
    """Every eos id the checkpoint declares: generation config, model config and tokenizer."""
    ids: set[int] = set()
    generation = path / "generation_config.json"
    sources = [hf_config.get("eos_token_id"), tokenizer.eos_token_id]
    if generation.is_file():
        sources.append(json.loads(generation.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def load_model(cfg: ModelConfig, *, with_weights: bool = True, alignment_mode: str = "fast") -> LoadedModel:
    """Resolve `cfg.source`, build the native model and load its weights onto the device.
    `alignment_mode` picks its kernels (`kernels.set_alignment_mode`); copies keep it. A quantised
    checkpoint (FP8, INT4) is dequantised into `cfg.dtype` weights; its `quantization_config` is
    dropped from `hf_config`, which describes the dense model that exports and syncs write."""
    path = resolve_model_source(cfg.source)
    hf_config = dense_config(read_hf_config(path))
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    with torch.device("meta"):
        model = build_model(hf_config)
    model = materialize(model, device, dtype)
    if with_weights:
        load_weights_into(model, path, dtype)
    set_alignment_mode(model, alignment_mode)
    tokenizer = load_tokenizer(path)
    return LoadedModel(model, tokenizer, hf_config, path, device, eos_token_ids(path, hf_config, tokenizer))


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Turn a model built on `meta` into real (uninitialised) tensors: re-tie shared weights
    and recompute non-persistent buffers such as RoPE frequencies."""
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()  # in fp32 whatever the model dtype, as HF keeps them
    return model
