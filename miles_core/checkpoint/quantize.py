"""`miles quantize`: a dense HF checkpoint -> block FP8 or compressed-tensors INT4, streamed.

What is streamed: the source is read one tensor at a time (safetensors files in index order),
each tensor is quantised on its own (`quant/formats.py`) and handed to `save_hf_checkpoint`'s
writer, which buffers at most one output shard (`max_shard_bytes`). Peak memory is one shard
plus one tensor, so a model larger than RAM quantises. `verify` is the exception: it builds the
source and the dequantised model in fp32 to compare their logits.

Safety: everything is written to a temp sibling of DST and renamed into place only when writing
(and verification) succeeded, so a failure leaves no DST; SRC is only read. Bad inputs fail
before any file is written: unknown format, a group size that does not divide a weight's input
features, a source that is not a dense HF checkpoint, an existing DST.

`verify` reads DST back through the same dequantising reader the engine and trainer use
(`hf.iter_dense_state_dict`) and reports, per quantised tensor, the largest absolute error and
the relative Frobenius error ||W - W'|| / ||W||; then the KL divergence KL(source || quantised)
of the next-token distributions and top-1 agreement over a few prompts (native model, fp32).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from miles_core.checkpoint.hf import (
    CONFIG_NAME, HFTensors, iter_dense_state_dict, iter_state_dict, load_weights_into, read_hf_config, write_hf_files,
)
from miles_core.checkpoint.loading import TOKENIZER_FILES, load_tokenizer, materialize
from miles_core.checkpoint.sources import resolve_model_source
from miles_core.errors import MilesError
from miles_core.models.registry import MODEL_REGISTRY, build_model
from miles_core.quant.formats import (
    QuantSpec, check_quantizable, checkpoint_format, is_quantized_weight, module_name, quantization_config,
    quantize_tensor,
)
from miles_core.utils.io import atomic_dir

VERIFY_PROMPTS = ("The capital of France is", "What is 7 + 5? Reply with only the number.",
                  "def fibonacci(n):", "Once upon a time, in a small village,")
ProgressFn = Callable[[str, int, int], None]
"""on_progress(stage, done, total); stages are 'quantize' and 'verify'."""


@dataclass
class TensorError:
    name: str
    max_abs: float
    rel: float


@dataclass
class QuantizeReport:
    src: str
    dst: str
    spec: dict[str, Any]
    num_quantized: int = 0
    num_dense: int = 0
    quantized_bytes_before: int = 0
    quantized_bytes_after: int = 0
    dense_bytes: int = 0
    seconds: float = 0.0
    errors: list[TensorError] = field(default_factory=list)
    logits: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bytes_before(self) -> int:
        return self.quantized_bytes_before + self.dense_bytes

    @property
    def bytes_after(self) -> int:
        return self.quantized_bytes_after + self.dense_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}


def quantize_checkpoint(src: str | Path, dst: str | Path, spec: QuantSpec, *, verify: bool = False,
                        max_shard_bytes: int = 5 * 2**30, on_progress: ProgressFn | None = None) -> QuantizeReport:
    """Quantise the dense checkpoint `src` (a HF directory or built-in model name) into `dst`."""
    dst = Path(dst).expanduser()
    if dst.exists():
        raise MilesError(f"output '{dst}' already exists; remove it or choose another path")
    src_dir = _source_dir(src)
    if dst.resolve().is_relative_to(src_dir.resolve()):
        raise MilesError(f"output '{dst}' is inside the source '{src_dir}'")
    hf_config = read_hf_config(src_dir)
    if checkpoint_format(hf_config) is not None:
        raise MilesError(f"'{src_dir}' is already quantised (quant_method "
                         f"'{hf_config['quantization_config'].get('quant_method')}'); quantise a dense checkpoint")
    with HFTensors(src_dir) as tensors:
        shapes = {name: tensors.shape(name) for name in tensors.names}
    check_quantizable(shapes, spec)
    report = QuantizeReport(str(src), str(dst), asdict(spec))
    progress = on_progress or (lambda stage, done, total: None)
    start = time.perf_counter()
    out_config = {**hf_config, "quantization_config": quantization_config(spec, _dense_modules(shapes, spec, hf_config))}
    with atomic_dir(dst) as tmp:
        stream = _quantized_stream(src_dir, spec, report, lambda done: progress("quantize", done, len(shapes)))
        write_hf_files(tmp, stream, out_config, source_dir=src_dir, max_shard_bytes=max_shard_bytes)
        if verify:
            report.errors = _tensor_errors(src_dir, tmp, spec, progress)
            report.logits = _logit_check(src_dir, tmp, hf_config, report)
    report.seconds = time.perf_counter() - start
    return report


def _source_dir(src: str | Path) -> Path:
    path = Path(src).expanduser()
    if path.is_file():
        raise MilesError(f"source '{src}' is a file; expected a HF checkpoint directory (config.json + safetensors)")
    if path.is_dir() and not (path / CONFIG_NAME).is_file():
        raise MilesError(f"source '{src}' is not a checkpoint: no {CONFIG_NAME}; expected a HF checkpoint directory")
    return resolve_model_source(str(src))


def _dense_modules(shapes: dict[str, tuple[int, ...]], spec: QuantSpec, hf_config: dict[str, Any]) -> list[str]:
    """Module names of the 2-D weights left dense, plus a tied `lm_head` absent from the files."""
    dense = [module_name(n) for n, s in shapes.items()
             if n.endswith(".weight") and len(s) == 2 and not is_quantized_weight(n, s, spec)]
    if hf_config.get("tie_word_embeddings") and "lm_head.weight" not in shapes:
        dense.append("lm_head")
    return dense


def _quantized_stream(src_dir: Path, spec: QuantSpec, report: QuantizeReport,
                      tick: Callable[[int], None]) -> Iterator[tuple[str, torch.Tensor]]:
    for done, (name, tensor) in enumerate(iter_state_dict(src_dir), start=1):
        try:
            out = quantize_tensor(name, tensor, spec)
        except ValueError as err:
            raise MilesError(f"cannot quantise '{name}' of '{src_dir}': {err}") from None
        after = sum(t.nbytes for _, t in out)
        if len(out) == 1 and out[0][0] == name:
            report.num_dense, report.dense_bytes = report.num_dense + 1, report.dense_bytes + tensor.nbytes
        else:
            report.num_quantized += 1
            report.quantized_bytes_before += tensor.nbytes
            report.quantized_bytes_after += after
        yield from out
        tick(done)


def _tensor_errors(src_dir: Path, out_dir: Path, spec: QuantSpec, progress: ProgressFn) -> list[TensorError]:
    errors = []
    with HFTensors(src_dir) as source:
        shapes = {n: source.shape(n) for n in source.names}
        total = sum(is_quantized_weight(n, s, spec) for n, s in shapes.items())
        for name, dequantized in iter_dense_state_dict(out_dir):
            if name in shapes and is_quantized_weight(name, shapes[name], spec):
                errors.append(tensor_error(name, source.get(name), dequantized))
                progress("verify", len(errors), total)
    return errors


def tensor_error(name: str, original: torch.Tensor, dequantized: torch.Tensor) -> TensorError:
    """Largest absolute and relative (Frobenius) error of a dequantised tensor, in fp64."""
    a, b = original.double(), dequantized.double()
    norm = float(a.norm())
    return TensorError(name, float((a - b).abs().max()), float((a - b).norm()) / norm if norm else 0.0)


def _logit_check(src_dir: Path, out_dir: Path, hf_config: dict[str, Any], report: QuantizeReport) -> dict[str, float] | None:
    if hf_config.get("model_type") not in MODEL_REGISTRY:
        report.notes.append(f"logits: skipped, no native model for model_type '{hf_config.get('model_type')}'")
        return None
    prompts = _prompt_ids(src_dir, int(hf_config["vocab_size"]))
    source, quantized = _native_model(src_dir, hf_config), _native_model(out_dir, hf_config)
    kls, agree, count = [], 0, 0
    with torch.no_grad():
        for ids in prompts:
            log_p, log_q = (_log_probs(model, ids) for model in (source, quantized))
            kls += (log_p.exp() * (log_p - log_q)).sum(-1).tolist()
            agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
            count += len(ids)
    return {"kl_mean": math.fsum(kls) / len(kls), "kl_max": max(kls), "top1_agree": agree / count,
            "num_prompts": float(len(prompts)), "num_tokens": float(count)}


def _prompt_ids(src_dir: Path, vocab_size: int) -> list[torch.Tensor]:
    """The verification prompts as token ids (the checkpoint's tokenizer), else seeded random ids."""
    if any((src_dir / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = load_tokenizer(src_dir)
        return [torch.tensor(tokenizer(text)["input_ids"]) for text in VERIFY_PROMPTS]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (16,), generator=generator) for _ in VERIFY_PROMPTS]


def _native_model(model_dir: Path, hf_config: dict[str, Any]) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(hf_config)
    model = materialize(model, torch.device("cpu"), torch.float32)
    load_weights_into(model, model_dir, torch.float32)
    return model.eval()


def _log_probs(model: torch.nn.Module, ids_T: torch.Tensor) -> torch.Tensor:
    ids_BT = ids_T[None]
    positions_BT = torch.arange(ids_BT.shape[1])[None]
    return model.lm_head(model(ids_BT, positions_BT))[0].double().log_softmax(-1)
