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

from miles_core.checkpoint.hf import HFTensors, load_weights_into, read_hf_config
from miles_core.checkpoint.sources import resolve_model_source
from miles_core.config import ModelConfig
from miles_core.errors import MilesError
from miles_core.kernels import set_alignment_mode
from miles_core.models.registry import build_model
from miles_core.quant.formats import checkpoint_format, dense_config
from miles_core.quant.modules import quantized_modules, swap_to_quantized

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


def load_model(cfg: ModelConfig, *, with_weights: bool = True, alignment_mode: str = "fast",
               quantized: bool = False) -> LoadedModel:
    """Resolve `cfg.source`, build the native model and load its weights onto the device.
    `alignment_mode` picks its kernels (`kernels.set_alignment_mode`); copies keep it. A quantised
    checkpoint (FP8, INT4) is dequantised into `cfg.dtype` weights, or with `quantized` kept as
    stored in `QuantLinear`s (`quant/modules.py`; `quant.modules.dense_copy` gives the dense
    model); its `quantization_config` is dropped from `hf_config`, which describes the dense model
    that exports and syncs write."""
    path = resolve_model_source(cfg.source)
    full_config = read_hf_config(path)
    hf_config = dense_config(full_config)
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    with torch.device("meta"):
        model = build_model(hf_config)
    model = materialize(model, device, dtype)
    if with_weights and quantized:
        _swap_for_checkpoint(model, path, full_config)
    if with_weights:
        load_weights_into(model, path, dtype, dequantize=not quantized)
    set_alignment_mode(model, alignment_mode)
    tokenizer = load_tokenizer(path)
    return LoadedModel(model, tokenizer, hf_config, path, device, eos_token_ids(path, hf_config, tokenizer))


def _swap_for_checkpoint(model: nn.Module, path: Path, hf_config: dict[str, Any]) -> None:
    """Swap the Linears a quantised checkpoint stores quantised for empty `QuantLinear`s."""
    fmt = checkpoint_format(hf_config)
    if fmt is None:
        raise MilesError(f"engine.weights = 'quantized' needs a quantised checkpoint (`miles quantize`), "
                         f"but '{path}' is dense; use engine.weights = 'dense'")
    group_size = 128
    if fmt == "int4":
        group_size = int(next(iter(hf_config["quantization_config"]["config_groups"].values()))["weights"]["group_size"])
    with HFTensors(path) as tensors:
        names = tensors.names
    try:
        swap_to_quantized(model, quantized_modules(names, fmt), fmt, group_size)
    except ValueError as err:
        raise MilesError(f"cannot load '{path}' quantised: {err}") from None


def materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Turn a model built on `meta` into real (uninitialised) tensors: re-tie shared weights
    and recompute non-persistent buffers such as RoPE frequencies."""
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()  # in fp32 whatever the model dtype, as HF keeps them
    return model
