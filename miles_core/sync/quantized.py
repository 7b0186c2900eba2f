"""Quantised weight sync (`sync.quantize = "fp8" | "int4"`): the engine gets the trainer's weights
as `miles quantize` would write them.

Each exported tensor goes through `quant.formats.quantize_tensor` (the same function as the
offline command, so with `train.qat` the engine's INT4 weights equal the trainer's fake-quantised
ones bit for bit). Then, by transport:
- `disk`: the quantised tensors and a `quantization_config` are written as the checkpoint the
  servers load (SGLang / vLLM read block FP8 and compressed-tensors INT4 natively; a server must
  have been started on a checkpoint of the same format). A native engine reads it back
  dequantised (`hf.iter_dense_state_dict`).
- `inprocess`: an engine holding quantised weights (`engine.weights = "quantized"`) takes the
  quantised tensors as they are; an engine holding dense weights gets each tensor dequantised
  right after quantisation, one at a time.
- `nccl`, `cuda_ipc`: the quantised tensors travel (half the bytes of bf16 for FP8, a quarter and
  a bit for INT4), as slime sends FP8 weights to SGLang servers that hold FP8 weights; a native
  server holding quantised weights takes them as they are, one holding dense weights dequantises
  each module on arrival (`quant.modules.dense_updates`; a bucket keeps a weight's parts
  together). `sync.check_weight_update_equal` then compares the quantised tensors, so it needs
  servers that hold them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Literal

import torch

from miles_core.quant.formats import (
    QuantSpec, checkpoint_format, is_quantized_weight, iter_dequantized, module_name, quantization_config,
    quantize_tensor,
)
from miles_core.quant.modules import holds_quantized
from miles_core.sync.guarded import close_inner
from miles_core.sync.protocol import SyncContext, SyncStats, WeightSync


def quantized(weights: Iterable[tuple[str, torch.Tensor]], spec: QuantSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensors of `weights` under `spec`, one source tensor at a time."""
    for name, tensor in weights:
        yield from quantize_tensor(name, tensor.detach(), spec)


def round_tripped(weights: Iterable[tuple[str, torch.Tensor]], spec: QuantSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """Dense (name, tensor) pairs holding what the quantised checkpoint dequantises to, in each
    tensor's own dtype."""
    fmt = spec.format
    for name, tensor in weights:
        parts = dict(quantize_tensor(name, tensor.detach(), spec))
        for dense_name, dense in iter_dequantized(parts, parts.__getitem__, fmt, torch.float32):
            yield dense_name, dense.to(tensor.dtype)


class QuantizedSync:
    """`WeightSync` that quantises on the way into another transport: `route` is `disk` (a
    quantised checkpoint), `local` (`inprocess`) or `remote` (`nccl`, `cuda_ipc`)."""

    def __init__(self, inner: WeightSync, spec: QuantSpec, *, route: Literal["disk", "local", "remote"]) -> None:
        self.inner, self.spec, self.route = inner, spec, route

    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncStats:
        if self.route == "remote":
            return self.inner.push(quantized(weights, self.spec), version)
        if self.route == "local":
            engine_model = getattr(getattr(self.inner, "engine", None), "model", None)
            if engine_model is not None and holds_quantized(engine_model):  # engine.weights = "quantized"
                return self.inner.push(quantized(weights, self.spec), version)
            return self.inner.push(round_tripped(weights, self.spec), version)
        weights = list(weights)  # names and shapes first: the config lists the modules left dense
        dense = [module_name(n) for n, t in weights
                 if n.endswith(".weight") and t.ndim == 2 and not is_quantized_weight(n, tuple(t.shape), self.spec)]
        context: SyncContext = self.inner.context
        hf_config = {k: v for k, v in context.hf_config.items() if k != "quantization_config"}
        if hf_config.get("tie_word_embeddings"):
            dense.append("lm_head")
        hf_config["quantization_config"] = quantization_config(self.spec, dense)
        checkpoint_format(hf_config)  # what we write must be what we read
        self.inner.context = dataclasses.replace(context, hf_config=hf_config)
        try:
            return self.inner.push(quantized(weights, self.spec), version)
        finally:
            self.inner.context = context

    def close(self) -> None:
        close_inner(self.inner)
