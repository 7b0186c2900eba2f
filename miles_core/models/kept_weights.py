"""A trainer's weights handed out as the same object push after push, while they stay in place.

A weight sync of a small model is mostly host time: ~300 tensors a push, each looked at (name,
storage, address, dtype, shape) on both ends, cost as much as copying 1 GB on an H200. A trainer
whose parameters stay where they are (the native trainer's: updated in place by the optimizer)
hands out one `KeptWeights` tuple for as long as that holds; a transport that sees the very tuple
of its last push reuses what it worked out then (buckets, descriptions, copy plans) without
looking at any weight again. `WeightExport` is the trainer's end: it builds the tuple once and
hands it out again after checking, in one C-level pass, that no parameter's address changed.
"""

from __future__ import annotations

import torch
from torch import nn

from miles_core.models.base import named_weights


class KeptWeights(tuple):
    """(HF name, tensor) pairs, each tensor a view of a weight that stays where it lies while this
    object is handed out (its owner hands out a new one when any moves). A transport keeps the
    last one it pushed, to know it again (holding its tensors until the next push)."""


class WeightExport:
    """`model`'s weights (tied ones once, detached) as one `KeptWeights`, rebuilt when a
    parameter's storage moved (`param.data = ...`, a `to()`), which changes its address. A
    parameter replaced by a new object is not seen: the owner builds a new export then (the
    trainers replace none after they are built)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._kept: KeptWeights | None = None
        self._weights: list[torch.Tensor] = []
        self._addresses: list[int] = []

    def current(self) -> KeptWeights:
        if self._kept is not None and list(map(torch.Tensor.data_ptr, self._weights)) == self._addresses:
            return self._kept
        named = list(named_weights(self.model))  # shared (tied) parameters appear once
        self._weights = [tensor for _, tensor in named]
        self._addresses = list(map(torch.Tensor.data_ptr, self._weights))
        self._kept = KeptWeights((name, tensor.detach()) for name, tensor in named)
        return self._kept
