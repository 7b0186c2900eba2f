"""HF checkpoint directories: `config.json`, safetensors weights (one file or shards + index)
and the tokenizer / chat / generation files that travel with them.

Reading streams tensor by tensor so a model never needs two full copies in memory. Writing
builds the whole directory in a temp sibling and renames it into place, so a crash never leaves
a half checkpoint under the final name. Tensor names are HF's, as are the native models'.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from miles_core.errors import MilesError
from miles_core.quant.fp8 import FP8_DTYPE
from miles_core.quant.formats import checkpoint_format, iter_dequantized
from miles_core.utils.io import atomic_dir

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# Everything besides weights and config that a HF model directory needs to be used as-is.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)

# Non-persistent buffers some exporters still write; the model recomputes them from the config.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_QUANTIZED_SUFFIXES = (".weight_scale_inv", ".weight_packed", ".weight_scale", ".weight_shape")
_MAX_LISTED_KEYS = 5


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a HF model directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MilesError(f"model directory '{model_dir}' does not exist")
    path = model_dir / CONFIG_NAME
    if not path.is_file():
        raise MilesError(f"'{path}' not found; expected a HF model directory with config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MilesError(f"'{path}' is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise MilesError(f"'{path}' must hold a JSON object, got {type(config).__name__}")
    return config


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a directory, in index order; every one is checked to exist."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise MilesError(f"'{index}' is not a valid safetensors index ({err!r})") from None
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise MilesError(f"shard '{file.name}' named in '{index}' does not exist")
        return files
    single = model_dir / WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise MilesError(f"no weights in '{model_dir}': expected {WEIGHTS_NAME} or {INDEX_NAME}")


def iter_state_dict(model_dir: str | Path, *, aligned: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, CPU tensor) one at a time from a directory's safetensors files; with
    `aligned=False` in safetensors' own buffers (`_own_memory`), for a caller that copies each
    tensor anyway (to the GPU, to another dtype) and aligns what it keeps on the CPU."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MilesError(f"model directory '{model_dir}' does not exist")
    for file in _weight_files(model_dir):
        yield from _iter_file(file, aligned)


def _iter_file(file: Path, aligned: bool) -> Iterator[tuple[str, torch.Tensor]]:
    # safetensors reports corruption as a multi-line Rust error without the path: say which file.
    try:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                yield name, _own_memory(tensor) if aligned else tensor
    except (SafetensorError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MilesError(f"cannot read safetensors file '{file}': {reason}") from None


def iter_dense_state_dict(model_dir: str | Path, *, aligned: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """`iter_state_dict`, with the weights of a quantised checkpoint (block FP8, compressed-tensors
    INT4: `quant/formats.py`) dequantised to fp32 under their dense names. A folder without
    config.json is read as dense."""
    model_dir = Path(model_dir)
    fmt = checkpoint_format(read_hf_config(model_dir)) if (model_dir / CONFIG_NAME).is_file() else None
    if fmt is None:
        yield from iter_state_dict(model_dir, aligned=aligned)
        return
    with HFTensors(model_dir, aligned=aligned) as tensors:
        try:
            yield from iter_dequantized(sorted(tensors.names), tensors.get, fmt, torch.float32)
        except ValueError as err:
            raise MilesError(f"cannot dequantise checkpoint '{model_dir}': {err}") from None


def load_state_dict(model_dir: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory, moved to `device` and cast to `dtype` (if given)."""
    return {name: tensor.to(device=device, dtype=dtype or tensor.dtype)
            for name, tensor in iter_state_dict(model_dir)}


def load_weights_into(model: nn.Module, model_dir: str | Path, dtype: torch.dtype | None = None, *,
                      dequantize: bool = True) -> None:
    """Load a HF directory into a native model whose parameter names are HF's.

    Each parameter's storage is replaced by the checkpoint tensor (cast to `dtype`, else to the
    parameter's dtype), so tied parameters stay tied and nothing is copied twice. A tied
    `lm_head.weight` may be absent; any other missing, unexpected or mis-shaped key is an error.
    A quantised checkpoint (FP8, INT4) is dequantised on the way in (`iter_dense_state_dict`);
    with `dequantize=False` its tensors load as stored into a model whose quantised Linears were
    swapped for `QuantLinear`s (`quant/modules.py`), quantised tensors and scales in their own dtype.
    Names ending with one of the model's `keep_in_fp32` suffixes load in fp32 whatever `dtype`
    (HF's `_keep_in_fp32_modules_strict`, e.g. the DeepSeek-V3 router).
    """
    targets = model.state_dict(keep_vars=True)
    fp32_suffixes = tuple(getattr(model, "keep_in_fp32", ()))
    if any(t.is_meta for t in targets.values()):
        raise ValueError("load_weights_into needs a materialised model, not one on the meta device")
    loaded: set[int] = set()
    unexpected: list[str] = []
    # Unaligned reads: each tensor is copied below anyway where it goes to the GPU or changes dtype.
    read = iter_dense_state_dict if dequantize else iter_state_dict
    for name, tensor in read(model_dir, aligned=False):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        target = targets.get(name)
        if target is None:
            unexpected.append(name)
            continue
        if tuple(target.shape) != tuple(tensor.shape):
            raise MilesError(f"shape mismatch for '{name}' in '{model_dir}': model expects "
                             f"{tuple(target.shape)}, checkpoint has {tuple(tensor.shape)}")
        as_stored = not dequantize and (tensor.dtype == FP8_DTYPE or name.endswith(_QUANTIZED_SUFFIXES))
        if tensor.is_floating_point() and tensor.dtype != FP8_DTYPE and not bool(torch.isfinite(tensor).all()):
            raise MilesError(f"checkpoint '{model_dir}' holds NaN/Inf in '{name}'; refusing to load it")
        keep_fp32 = bool(fp32_suffixes) and name.endswith(fp32_suffixes)
        cast = tensor.dtype if as_stored else torch.float32 if keep_fp32 else dtype or target.dtype
        target.data = _own_memory(tensor.to(device=target.device, dtype=cast))
        loaded.add(id(target))
    # Identity, not names: a tied lm_head is the embedding's own Parameter, loaded under its name.
    missing = [name for name, target in targets.items() if id(target) not in loaded]
    if missing or unexpected:
        raise MilesError(f"checkpoint '{model_dir}' does not match the model: "
                         f"missing keys {_first(missing)}, unexpected keys {_first(unexpected)}")


CPU_ALIGNMENT = 64
"""Bytes torch's CPU allocator aligns every buffer to."""


def _own_memory(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied into torch's own memory where it lies at an address that memory never has.

    safetensors >= 0.8 hands out CPU tensors in buffers aligned to 8 bytes; CPU GEMM kernels take
    other code paths for them and round differently, so a model computing with them differs in the
    last bits from the same weights anywhere else (a clone, a copy the engine fuses, a converted
    checkpoint's): every tensor read here that stays on the CPU goes through this.
    """
    if tensor.device.type == "cpu" and tensor.data_ptr() % CPU_ALIGNMENT:
        return tensor.clone()
    return tensor


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED_KEYS]) or "none"
    more = len(names) - _MAX_LISTED_KEYS
    return f"[{shown}{f' and {more} more' if more > 0 else ''}]"


def save_hf_checkpoint(out_dir: str | Path, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       hf_config: dict[str, Any], *, source_dir: str | Path | None = None,
                       max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> Path:
    """Write a HF directory atomically: weights (sharded past `max_shard_bytes`), config, and
    the tokenizer / chat / generation files found in `source_dir`.

    Tensors are consumed one at a time and buffered only up to one shard. With
    `tie_word_embeddings` the redundant `lm_head.weight` is dropped, as HF does.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_hf_files(tmp, named_tensors, hf_config, source_dir=source_dir, max_shard_bytes=max_shard_bytes,
                       dtype=dtype)
    return out_dir


def write_hf_files(folder: Path, named_tensors: Iterable[tuple[str, torch.Tensor]], hf_config: dict[str, Any], *,
                   source_dir: str | Path | None = None, max_shard_bytes: int = 5 * 2**30,
                   dtype: torch.dtype | None = None) -> None:
    """`save_hf_checkpoint`'s files, written into `folder` (an existing temp folder that the
    caller renames into place, e.g. a full training checkpoint with more beside the export)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    config = _config_for_dtype(hf_config, dtype)
    skip = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    shards = _write_shards(folder, ((n, t) for n, t in named_tensors if n not in skip), max_shard_bytes, dtype)
    _name_shards(folder, shards)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if source_dir is not None:
        _copy_side_files(Path(source_dir), folder)


def _config_for_dtype(hf_config: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    config = dict(hf_config)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config["torch_dtype"] = name
        if "dtype" in config:  # transformers 5 spelling; keep both in agreement
            config["dtype"] = name
    return config


def _write_shards(tmp: Path, named_tensors: Iterable[tuple[str, torch.Tensor]],
                  max_shard_bytes: int, dtype: torch.dtype | None) -> list[tuple[Path, list[str], int]]:
    """Write numbered temp shards; return (path, names, bytes) for each."""
    shards = []
    for shard in _group_shards(_unique_standalone(named_tensors, dtype), max_shard_bytes):
        path = tmp / f"shard-{len(shards):05d}.tmp"
        save_file(shard, path, metadata={"format": "pt"})
        shards.append((path, list(shard), sum(t.nbytes for t in shard.values())))
    if not shards:
        raise MilesError("no tensors to save: the checkpoint would be empty")
    return shards


def _unique_standalone(named_tensors: Iterable[tuple[str, torch.Tensor]],
                       dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            raise MilesError(f"tensor '{name}' is given twice; checkpoint names must be unique")
        seen.add(name)
        yield name, _standalone(tensor, dtype)


def _group_shards(named_tensors: Iterator[tuple[str, torch.Tensor]],
                  max_shard_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive tensors, cut before a shard would pass the limit (a lone larger tensor is
    its own shard, as in HF)."""
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in named_tensors:
        if shard and size + tensor.nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
    if shard:
        yield shard


def _standalone(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage: safetensors refuses shared or strided
    tensors, and a buffered view would keep its whole base alive."""
    tensor = tensor.detach()
    converted = tensor.to(device="cpu", dtype=dtype or tensor.dtype)
    if converted.data_ptr() == tensor.data_ptr() or not converted.is_contiguous():
        converted = converted.clone(memory_format=torch.contiguous_format)
    return converted


def _name_shards(tmp: Path, shards: list[tuple[Path, list[str], int]]) -> None:
    """Rename temp shards to HF names; more than one gets `model-0000i-of-0000N` and an index."""
    if len(shards) == 1:
        shards[0][0].rename(tmp / WEIGHTS_NAME)
        return
    weight_map: dict[str, str] = {}
    for number, (path, names, _) in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        path.rename(tmp / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": sum(size for *_, size in shards)},
             "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _copy_side_files(source_dir: Path, out_dir: Path) -> None:
    if not source_dir.is_dir():
        raise MilesError(f"source directory '{source_dir}' does not exist")
    for name in SIDE_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out_dir / name)


class HFTensors(contextlib.ExitStack):
    """Random access by name to the tensors of a HF directory (one open handle per file)."""

    def __init__(self, model_dir: Path, *, aligned: bool = True) -> None:
        super().__init__()
        self._aligned = aligned
        """False: tensors in safetensors' own buffers (`iter_state_dict`'s `aligned`)."""
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for file in _weight_files(Path(model_dir)):
            for name in self._handle(file).keys():
                self._file_of[name] = file
        self.names = set(self._file_of)

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = self.enter_context(safe_open(file, framework="pt"))
            except (SafetensorError, OSError) as err:
                raise MilesError(f"cannot read safetensors file '{file}': {str(err).splitlines()[0]}") from None
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        tensor = self._handle(self._file_of[name]).get_tensor(name)
        return _own_memory(tensor) if self._aligned else tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())
