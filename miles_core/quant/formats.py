"""Quantised HF checkpoint formats: which tensors are quantised, their names on disk, the
`quantization_config` that SGLang, vLLM and `transformers` read, and the way back to dense.

Two formats, each the one the serving engines already load:
- `fp8`: block FP8 (`fp8.py`) in the DeepSeek-V3 / Qwen3-FP8 layout: `X.weight` holds e4m3fn and
  `X.weight_scale_inv` its fp32 block scales; `quantization_config` = {quant_method "fp8", fmt
  "e4m3", activation_scheme "dynamic", weight_block_size [128, 128], modules_to_not_convert}.
  SGLang reads the skip list as `ignored_layers` or `modules_to_not_convert`, vLLM the same
  two (in that order), `transformers` as `modules_to_not_convert`: we write the last.
- `int4`: compressed-tensors `pack-quantized` W4A16 (`int4.py`): `X.weight_packed`,
  `X.weight_scale`, `X.weight_shape`; `quantization_config` = {quant_method
  "compressed-tensors", format "pack-quantized", config_groups.group_0 = {targets ["Linear"],
  weights {num_bits 4, type int, symmetric, strategy group, group_size}}, ignore}. compressed-
  tensors quantises every `Linear` not in `ignore`, so `ignore` names every 2-D weight we left
  dense (and `lm_head` when it is tied to the embedding and absent from the files).

A tensor is quantised when it is a 2-D `.weight` whose module name matches no ignore pattern
(shell-style globs, `fnmatch`) and, when `include` globs are given, one of them. The defaults keep what quantises badly or is not a matmul
weight: the output head, embeddings, norms and MoE routers. Nothing here touches files.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from miles_core.errors import MilesError, one_of
from miles_core.quant.fp8 import BLOCK_SIZE, FP8_DTYPE, dequantize_fp8_block, quantize_fp8_block
from miles_core.quant.int4 import GROUP_SIZES, check_group_size, dequantize_int4, pack_int4, quantize_int4, unpack_int4

FORMATS = ("fp8", "int4")
COMPANION_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".weight_shape")
"""Tensors that complete a quantised weight (block FP8's scales; INT4's scales and shape), written
right after it (`quantize_tensor`)."""
DEFAULT_IGNORE = ("lm_head", "*embed_tokens", "*norm", "*.mlp.gate", "*shared_expert_gate", "*.shared_head.head")
"""Module-name globs kept dense: output heads (main and MTP), embeddings, norms, MoE routers."""


@dataclass(frozen=True)
class QuantSpec:
    """What `miles quantize` (and `sync.quantize`) makes of a dense checkpoint."""

    format: str
    group_size: int = 128
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    include: tuple[str, ...] = ()
    """When given, only modules matching one of these globs (and no `ignore` glob) are quantised."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise one_of("quantization format", self.format, FORMATS)
        if self.format == "int4" and self.group_size not in GROUP_SIZES:
            raise MilesError(f"INT4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                             f"got {self.group_size}")


def module_name(name: str) -> str:
    return name.removesuffix(".weight")


def is_quantized_weight(name: str, shape: tuple[int, ...], spec: QuantSpec) -> bool:
    """Whether the checkpoint tensor `name` of `shape` is quantised under `spec`."""
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    module = module_name(name)
    if spec.include and not any(fnmatch.fnmatchcase(module, pattern) for pattern in spec.include):
        return False
    return not any(fnmatch.fnmatchcase(module, pattern) for pattern in spec.ignore)


def check_quantizable(shapes: dict[str, tuple[int, ...]], spec: QuantSpec) -> list[str]:
    """Names of the tensors `spec` quantises; a clear error for one it cannot (INT4 group size)."""
    chosen = [name for name, shape in shapes.items() if is_quantized_weight(name, shape, spec)]
    if not chosen:
        raise MilesError(f"nothing to quantise: no 2-D '.weight' tensor matches {list(spec.include or ['*'])} "
                         f"outside the ignore patterns {list(spec.ignore)}")
    if spec.format == "int4":
        for name in chosen:
            try:
                check_group_size(shapes[name], spec.group_size, name)
            except ValueError as err:
                raise MilesError(f"{err}; choose a --group-size (32, 64 or 128) that divides it, or --ignore it") from None
    return chosen


def quantize_tensor(name: str, tensor: torch.Tensor, spec: QuantSpec) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint tensors that stand for one dense tensor (itself when not quantised)."""
    if not is_quantized_weight(name, tuple(tensor.shape), spec):
        return [(name, tensor)]
    if spec.format == "fp8":
        q, scale_inv = quantize_fp8_block(tensor)
        return [(name, q), (f"{name}_scale_inv", scale_inv)]
    q, scale = quantize_int4(tensor, spec.group_size)
    module = module_name(name)
    return [(f"{module}.weight_packed", pack_int4(q)), (f"{module}.weight_scale", scale),
            (f"{module}.weight_shape", torch.tensor(tuple(tensor.shape), dtype=torch.int64))]


def quantization_config(spec: QuantSpec, dense_modules: Iterable[str]) -> dict[str, Any]:
    """config.json's `quantization_config` for `spec`; `dense_modules`: the 2-D weights left dense."""
    dense = sorted(set(dense_modules))
    if spec.format == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [BLOCK_SIZE, BLOCK_SIZE], "modules_to_not_convert": dense}
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": spec.group_size, "dynamic": False, "actorder": None, "observer": "minmax"}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
             "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": dense, "kv_cache_scheme": None}


def checkpoint_format(hf_config: dict[str, Any]) -> str | None:
    """`fp8`, `int4` or None (dense) for a HF config; an error for a quantisation we cannot read."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "fp8" and list(qc.get("weight_block_size") or []) == [BLOCK_SIZE, BLOCK_SIZE]:
        return "fp8"
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        weights = [g.get("weights") or {} for g in groups]
        if qc.get("format") == "pack-quantized" and weights and all(
                w.get("num_bits") == 4 and w.get("type") == "int" and w.get("symmetric") and w.get("strategy") == "group"
                for w in weights):
            return "int4"
    raise MilesError(f"unsupported quantization_config {qc!r}: miles reads block FP8 (quant_method 'fp8', "
                     f"weight_block_size [128, 128]) and compressed-tensors pack-quantized symmetric group INT4")


def dense_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The HF config without its `quantization_config` (what a dequantised model is)."""
    return {k: v for k, v in hf_config.items() if k != "quantization_config"}


def iter_dequantized(names: Iterable[str], get: Callable[[str], torch.Tensor], fmt: str | None,
                     dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(dense name, tensor) of a checkpoint in format `fmt`: quantised weights dequantised to
    `dtype`, their scale / shape companions consumed, every other tensor as stored."""
    names = list(names)
    present = set(names)
    for name in names:
        if fmt == "fp8" and name.endswith(".weight_scale_inv"):
            continue
        if fmt == "int4" and name.endswith((".weight_scale", ".weight_shape")) and \
                f"{name.rsplit('.', 1)[0]}.weight_packed" in present:
            continue
        tensor = get(name)
        if fmt == "fp8" and tensor.dtype == FP8_DTYPE:
            yield name, dequantize_fp8_block(tensor, _companion(get, present, f"{name}_scale_inv"), dtype)
        elif fmt == "int4" and name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            shape = tuple(int(v) for v in _companion(get, present, f"{module}.weight_shape"))
            scale = _companion(get, present, f"{module}.weight_scale")
            yield f"{module}.weight", dequantize_int4(unpack_int4(tensor, shape), scale).to(dtype)
        else:
            yield name, tensor


def _companion(get: Callable[[str], torch.Tensor], present: set[str], name: str) -> torch.Tensor:
    if name not in present:
        raise MilesError(f"quantised checkpoint lacks '{name}'")
    return get(name)
