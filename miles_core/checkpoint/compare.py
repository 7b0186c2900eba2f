"""Comparators shared by `miles convert --verify` and `miles align-check`: tensors bit by bit,
logits as distributions.

`compare_tensors` says whether two tensors are the same bits (dtype, shape and every element's
bit pattern, so NaNs and -0.0 count); `BitwiseReport` accumulates that over a checkpoint and
keeps the first mismatches by name. `compare_logits` measures how far two models' next-token
distributions are apart:

    max_abs / mean_abs  over |a - b| of the raw logits (float64)
    kl                  mean over positions of KL(p_a || p_b) = sum_v p_a(v) (log p_a(v) - log p_b(v)),
                        with p = softmax(logits) in float64
    top1_agree          fraction of positions whose argmax token agrees
    bitwise             1.0 when the logits are the same bits, else 0.0
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_MAX_KEPT = 10


@dataclass(frozen=True)
class TensorDiff:
    """Why two tensors of one name differ ('' when they are the same bits)."""

    name: str
    reason: str

    @property
    def equal(self) -> bool:
        return not self.reason


def compare_tensors(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorDiff:
    """Bitwise comparison; the reason names the first difference found (dtype, shape, values)."""
    if a.dtype != b.dtype:
        return TensorDiff(name, f"dtype {a.dtype} vs {b.dtype}")
    if a.shape != b.shape:
        return TensorDiff(name, f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.numel() == 0 or torch.equal(_bits(a), _bits(b)):
        return TensorDiff(name, "")
    differ = (_bits(a) != _bits(b)).sum().item()
    max_abs = (a.double() - b.double()).abs().nan_to_num(nan=float("inf")).max().item() \
        if a.is_floating_point() else float("nan")
    return TensorDiff(name, f"{differ} of {a.numel()} elements differ (max abs {max_abs:.3g})")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns as integers (floats compared by bits, not value)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.element_size() in ints else t


@dataclass
class BitwiseReport:
    """Tensor-by-tensor comparison of two checkpoints under shared names."""

    compared: int = 0
    mismatches: list[TensorDiff] = field(default_factory=list)
    num_mismatches: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def add(self, name: str, expected: torch.Tensor, actual: torch.Tensor) -> None:
        self.compared += 1
        diff = compare_tensors(name, expected, actual)
        if not diff.equal:
            self.num_mismatches += 1
            if len(self.mismatches) < _MAX_KEPT:
                self.mismatches.append(diff)

    @property
    def ok(self) -> bool:
        return self.compared > 0 and not (self.num_mismatches or self.missing or self.unexpected)

    def summary(self) -> str:
        if self.ok:
            return f"{self.compared} tensors bitwise identical"
        parts = [f"{self.num_mismatches} of {self.compared} tensors differ"]
        parts += [f"{d.name}: {d.reason}" for d in self.mismatches[:3]]
        if self.missing:
            parts.append(f"missing {', '.join(self.missing[:3])}")
        if self.unexpected:
            parts.append(f"unexpected {', '.join(self.unexpected[:3])}")
        return "; ".join(parts)


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Distance between two (..., V) logit tensors; see the module docstring for each metric."""
    if a.shape != b.shape:
        raise ValueError(f"logits shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a64, b64 = a.detach().double().reshape(-1, a.shape[-1]), b.detach().double().reshape(-1, b.shape[-1])
    diff = (a64 - b64).abs()
    log_pa, log_pb = a64.log_softmax(-1), b64.log_softmax(-1)
    kl = (log_pa.exp() * (log_pa - log_pb)).sum(-1)
    return {
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
        "kl": kl.mean().item(),
        "top1_agree": (a64.argmax(-1) == b64.argmax(-1)).double().mean().item(),
        "bitwise": float(compare_tensors("logits", a, b).equal),
    }
