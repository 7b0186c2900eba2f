"""The sampler's per-row tensors (temperature, top-k, top-p) for one decode step.

An RL batch has one sampling setting for every row: its tensors are filled on the device and kept
for the next steps while the setting and the row count stay (no host-to-device copy a step; the
sampler only reads them). Mixed settings are copied from pinned memory without waiting on the GPU.
"""

from __future__ import annotations

import torch

from miles_core.engine.sampler import SamplerFlags
from miles_core.utils.device import to_device


class SamplingTensors:
    """Builds and keeps the sampler's per-row parameter tensors."""

    def __init__(self) -> None:
        self._kept: tuple | None = None

    def of(self, params: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SamplerFlags]:
        """Per-row temperature, top-k, top-p of `params` (the rows' sampling configs), and what
        the sampler must do for them (`SamplerFlags`)."""
        first = params[0]
        setting = _setting(first)
        if all(p is first for p in params) or all(_setting(p) == setting for p in params):
            key = (setting, len(params), device)
            if self._kept is None or self._kept[0] != key:
                B = len(params)
                self._kept = key, (
                    torch.full((B,), first.temperature, device=device), torch.full((B,), first.top_k, device=device),
                    torch.full((B,), first.top_p, device=device), _flags([first]))
            return self._kept[1]
        return (to_device(torch.tensor([p.temperature for p in params]), device),
                to_device(torch.tensor([p.top_k for p in params]), device),
                to_device(torch.tensor([p.top_p for p in params]), device), _flags(params))


def _setting(sampling) -> tuple:
    """What the sampler reads of a row's sampling config (types too: an int and a float fill
    tensors of different dtypes)."""
    values = (sampling.temperature, sampling.top_k, sampling.top_p)
    return values + tuple(type(v) for v in values)


def _flags(params: list) -> SamplerFlags:
    """A sampled (not greedy) row with top-k or top-p (the sampler sorts), a greedy row, a
    temperature that divides (neither 0 nor 1)."""
    return SamplerFlags(filtered=any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in params),
                        greedy=any(p.temperature == 0 for p in params),
                        scaled=any(p.temperature not in (0, 1) for p in params))
