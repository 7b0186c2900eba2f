"""Guards that stop a run before non-finite numbers leave the trainer: weights before they are
synced to the engine or saved, advantages before they enter the float32 loss."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from miles_core.errors import MilesError


def check_finite_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], step: int) -> None:
    """Raise naming the first tensor holding NaN/Inf after rollout step `step`'s update."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kind = "nan" if bool(torch.isnan(tensor).any()) else "inf"
            raise MilesError(f"step {step}: weight '{name}' holds {kind} after the update; stopped before the "
                             "weight sync and the checkpoint save (lower train.lr or check the rewards)")


def finite_float32(name: str, values: torch.Tensor | None) -> torch.Tensor | None:
    """`values` (computed in float64 from the rewards) as float32; an overflow is an error."""
    if values is None:
        return None
    out = values.float()
    if not bool(torch.isfinite(out).all()):
        largest = float(values.double().abs().nan_to_num(posinf=float("inf")).max())
        raise MilesError(f"{name} overflow float32 (largest |value| {largest:.3g}, float32 max 3.4e38); "
                         "scale the rewards down")
    return out
