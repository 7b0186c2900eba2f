"""Guards against non-finite numbers in the trainer: a skipped optimizer step for a NaN/Inf loss
or gradient norm (`BadStepGuard`), and, as the last line of defence, a stop before non-finite
weights are synced to the engine or saved, or non-finite advantages enter the float32 loss."""

from __future__ import annotations

import math

from collections.abc import Iterable

import torch

from miles_core.errors import MilesError


WINDOW_BYTES = 512 << 20
"""Tensors checked together: weights made afresh for the check (FSDP's gathered ones) are held
this long at most, as a bucket of a weight sync is (`sync.bucket_mb`'s default)."""


def check_finite_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], step: int) -> None:
    """Raise naming the first tensor holding NaN/Inf after rollout step `step`'s update. One read
    from the device per window of `WINDOW_BYTES` (and dtype), not one per tensor (~300 waits for
    the GPU a step at 0.6B): the L2 norm of every tensor in one multi-tensor call, non-finite
    exactly when the tensor holds NaN/Inf or its squares overflow; only those are then looked at
    one by one."""
    window: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if tensor.is_floating_point():
            window.append((name, tensor))
            size += tensor.nbytes
        if size >= WINDOW_BYTES:
            _check_window(window, step)
            window, size = [], 0
    _check_window(window, step)


def _check_window(named: list[tuple[str, torch.Tensor]], step: int) -> None:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, (_, tensor) in enumerate(named):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    suspects = []
    for indices in groups.values():
        norms = torch._foreach_norm([named[i][1].detach() for i in indices], 2)
        finite = torch.isfinite(torch.stack(norms)).tolist()  # the one read for the group
        suspects += [i for i, ok in zip(indices, finite) if not ok]
    for index in sorted(suspects):  # in the order given: the first bad one is named
        name, tensor = named[index]
        if not bool(torch.isfinite(tensor).all()):  # an overflowing norm of finite weights passes here
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


class BadStepGuard:
    """Skip-step guard: an optimizer step whose loss or gradient norm is NaN/Inf is skipped (the
    caller zeroes the gradients and steps neither optimizer nor scheduler); after
    `max_bad_steps` such steps in a row the run stops. One bad batch (a NaN reward that slipped
    through a hook, an overflowing loss) then costs one step, not the run."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps, self.in_row = max_bad_steps, 0
        self.notes: list[str] = []
        """One line per step skipped since `notes` was last cleared."""

    def should_skip(self, loss: float, grad_norm: float, samples: list[int]) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_row = 0
            return False
        self.in_row += 1
        where = f"samples {', '.join(map(str, samples))}" if samples else "not traced to a sample (finite loss)"
        note = f"loss {loss}, grad norm {grad_norm}; {where}"
        if self.in_row >= self.max_bad_steps:
            raise MilesError(f"{self.in_row} optimizer steps in a row had a non-finite loss or gradient norm "
                             f"(train.max_bad_steps = {self.max_bad_steps}); last: {note}. Check the rewards and "
                             "advantages, lower train.lr, or resume from an earlier checkpoint")
        self.notes.append(note)
        return True


def nonfinite_rows(positions: list[int], mask: torch.Tensor, *per_token: torch.Tensor | None) -> list[int]:
    """The `positions` whose trained tokens hold NaN/Inf in any of the (N, T) tensors; all of
    them when none does (the micro-batch's loss was bad as a whole)."""
    bad = torch.zeros(len(positions), dtype=torch.bool)
    for values in per_token:
        if values is not None:
            bad |= (~torch.isfinite(values.detach().float()) & (mask > 0)).any(dim=1).cpu()
    return [p for p, b in zip(positions, bad.tolist()) if b] or list(positions)
