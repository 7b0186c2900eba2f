"""`miles align-check --precision`: which low-precision pairing of trainer and engine is measured.

Each row sets up the trainer and the engine's weights as a training run with that pairing would
(`train.qat`, `sync.quantize`), then the usual comparison runs:
- `recipe`: as the recipe says (no change).
- `fp8-engine`: trainer as the recipe (`train.precision` bf16 or fp8, no QAT), engine holding the
  trainer's weights block-FP8 quantised (every Linear outside the default ignore list).
- `int4-qat`: trainer with INT4 QAT on `train.qat_modules`, engine holding those modules INT4
  (`train.qat_group_size`): the same weights bit for bit, so in invariant mode KL = 0.
- `int4-engine`: the same INT4 engine with a plain trainer: the gap QAT removes.
The engine gets the weights as the in-process sync delivers them on CPU (quantised, then
dequantised), so the rows measure quantisation, not transport.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from miles_core.config import TrainConfig
from miles_core.errors import one_of
from miles_core.models.base import named_weights
from miles_core.quant.formats import QuantSpec
from miles_core.sync.quantized import round_tripped

PRECISIONS = ("recipe", "fp8-engine", "int4-qat", "int4-engine")


def precision_setup(train: TrainConfig, precision: str) -> tuple[TrainConfig, QuantSpec | None]:
    """(trainer config, quantisation of the engine's weights or None) for a `--precision` row."""
    if precision not in PRECISIONS:
        raise one_of("--precision", precision, PRECISIONS)
    if precision == "recipe":
        return train, None
    if precision == "fp8-engine":
        return replace(train, qat="off"), QuantSpec("fp8")
    spec = QuantSpec("int4", train.qat_group_size, include=train.qat_modules)
    return replace(train, qat="int4" if precision == "int4-qat" else "off"), spec


def load_engine_weights(engine_model: nn.Module, weights, spec: QuantSpec) -> None:
    """Write the trainer's exported `weights`, quantised by `spec` and dequantised, into the engine."""
    targets = dict(named_weights(engine_model, remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in round_tripped(weights, spec):
            targets[name].copy_(tensor)
