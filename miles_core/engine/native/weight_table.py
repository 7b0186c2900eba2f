"""The engine's weights by HF name: what `update_weights` writes into and `get_weights_by_name`
reads, checked before anything is written.

The map is built once: walking the model's modules on every update took 5 of the 8 ms of a 0.6B
in-process weight sync on an H100. Releasing the engine's memory replaces the buffers (the
parameters keep their objects), so the engine calls `invalidate` then. A sync sends the same
buckets push after push, so the targets of the last `MAX_CHECKED` checked (name, dtype, shape)
lists that need no (de)quantisation are kept, and a list seen before skips every per-name step.
The very tuple of the last update (a `cuda_ipc` server hands out the same views push after push)
skips even building that list's key (~0.1 ms at 0.6B).

After a release that dropped the weights (`release_memory(keep_weights=False)`) the table counts
which weights no update has rewritten yet (`expect_rewrite`, `unwritten`): the engine refuses to
generate from any of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from miles_core.errors import MilesError
from miles_core.kernels.batched_copy import BatchedCopier
from miles_core.models.base import named_weights
from miles_core.quant.modules import QuantLinear, dense_updates, quantize_updates


MAX_CHECKED = 64
"""(name, dtype, shape) lists whose targets are kept (a 4B model sends ~10 buckets a push)."""


class WeightTable:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._by_name: dict[str, torch.Tensor] | None = None
        self._has_quantized = False
        self._checked: OrderedDict[tuple, tuple[tuple, list[torch.Tensor]]] = OrderedDict()
        """(name, dtype, shape) list -> (that list, its targets)."""
        self._last: tuple | None = None
        """(the tuple of (name, tensor) last passed, its targets, its sources, its key): immutable,
        so the same object is the same update."""
        self.copier = BatchedCopier()
        self._unwritten: set[str] = set()
        """Names of the weights dropped at a release and not written by any update since (kept
        across `invalidate`: a name stays a name when its tensor moves)."""
        self._names_by_id: dict[int, list[str]] | None = None

    def invalidate(self) -> None:
        """The weights moved (a memory release or resume): forget every name, list and copy plan."""
        self._by_name = None
        self._checked.clear()
        self._last = None
        self._names_by_id = None
        self.copier.clear()

    def write(self, targets: list[torch.Tensor], sources: list[torch.Tensor], key: tuple | None) -> None:
        """Copy `checked_updates`' sources into its targets: one launch on CUDA (`kernels.batched_copy`)."""
        self.copier.copy(targets, sources, key)
        if self._unwritten:  # only between a release that dropped the weights and a full update
            if self._names_by_id is None:
                self._names_by_id = {}
                for name, tensor in self.tensors().items():  # tied weights: one tensor, two names
                    self._names_by_id.setdefault(id(tensor), []).append(name)
            for target in targets:
                self._unwritten.difference_update(self._names_by_id.get(id(target), ()))

    def expect_rewrite(self) -> None:
        """Every weight lost its contents (dropped at a release): each counts as unwritten until
        an update writes it."""
        self._unwritten = set(self.tensors())

    def unwritten(self) -> list[str]:
        """Names of the weights dropped at a release that no update has written since."""
        return [name for name in self.tensors() if name in self._unwritten] if self._unwritten else []

    def get(self, name: str, where: str) -> torch.Tensor:
        """The tensor the engine computes with under HF name `name` (parameter or persistent buffer)."""
        tensors = self.tensors()
        if name not in tensors:
            raise MilesError(f"{where}: unknown parameter '{name}'")
        return tensors[name]

    def checked_updates(self, named_tensors: Iterable[tuple[str, torch.Tensor]]
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple | None]:
        """(destinations, sources, key) once every name and shape is checked; `key` is the sources'
        (name, dtype, shape) list where they pass as they came (None where they were converted). A
        dense weight aimed at a quantised module (engine.weights = "quantized") is quantised as
        `miles quantize` does; a quantised weight aimed at a dense module is dequantised."""
        last = self._last
        if last is not None and last[0] is named_tensors:
            return list(last[1]), list(last[2]), last[3]
        named = list(named_tensors)
        key = tuple([(name, tensor.dtype, tensor.shape) for name, tensor in named])
        kept = self._checked.get(key)
        if kept is not None:  # seen before: checked, and nothing to quantise or dequantise
            self._checked.move_to_end(key)
            key, targets = kept  # the kept key object: the copier knows it without hashing it again
            self._remember(named_tensors, targets, key)
            return list(targets), [tensor for _, tensor in named], key
        tensors = self.tensors()
        updates = dense_updates(tensors, named)
        if self._has_quantized:
            updates = list(quantize_updates(self.model, updates))
        for name, tensor in updates:
            target = self.get(name, "update_weights")
            if target.shape != tensor.shape:
                raise MilesError(f"update_weights: '{name}' has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(target.shape)}")
        targets = [tensors[name] for name, _ in updates]
        if updates is not named:
            return targets, [tensor for _, tensor in updates], None
        self._checked[key] = (key, targets)  # passed through as they came: the next same list needs no look
        if len(self._checked) > MAX_CHECKED:
            self._checked.popitem(last=False)
        self._remember(named_tensors, targets, key)
        return list(targets), [tensor for _, tensor in named], key

    def _remember(self, named_tensors: Iterable, targets: list[torch.Tensor], key: tuple) -> None:
        if isinstance(named_tensors, tuple):
            self._last = (named_tensors, targets, [tensor for _, tensor in named_tensors], key)
        else:
            self._last = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The engine's tensors by HF name (tied weights: one tensor under each name)."""
        if self._by_name is None:
            self._by_name = dict(named_weights(self.model, remove_duplicate=False))
            self._has_quantized = any(isinstance(m, QuantLinear) for m in self.model.modules())
        return self._by_name
