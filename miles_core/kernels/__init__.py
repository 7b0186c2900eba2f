"""Numerical kernels: a plain-PyTorch reference next to every fast and batch-invariant path.

`Ops` bundles the operations whose reduction order decides whether the rollout engine and
the trainer compute bitwise-identical log-probs: linear layers, attention, RMSNorm, log-softmax,
and the MoE routers' softmax and sigmoid; and the elementwise chains (RoPE, SwiGLU) that fast
mode fuses on CUDA (`elementwise`). `fast` uses vendor kernels (small train/inference mismatch, corrected by TIS/MIS);
`invariant` uses kernels whose per-row result does not depend on batch size, padding or
prefill vs decode, so engine and trainer agree exactly (KL = 0). The mode is set per model
instance with `set_alignment_mode`, and both the engine's and the trainer's models get it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from miles_core.kernels import invariant
from miles_core.kernels.attention import attention_reference
from miles_core.kernels.elementwise import rms_norm_fast, rotary_fast, silu_mul_fast
from miles_core.kernels.matmul import linear_reference
from miles_core.kernels.packed import packed_attention_fast
from miles_core.kernels.norms import (
    log_softmax_reference,
    sigmoid_invariant,
    softmax_invariant,
    softmax_reference,
)

AlignmentMode = Literal["fast", "invariant"]


@dataclass(frozen=True)
class Ops:
    name: str
    linear: Callable
    attention: Callable
    rms_norm: Callable
    log_softmax: Callable
    softmax: Callable
    sigmoid: Callable
    packed_attention: Callable
    """(q, k, v, position_ids, PackedSegments): attention within the segments of a packed row."""
    rotary: Callable
    """(x, cos, sin): rotate-half RoPE."""
    silu_mul: Callable
    """(gate, up): silu(gate) * up."""
    fusion_agrees: Callable
    """(stacked weight, block sizes) -> whether `linear` on the stacked weight gives each block's
    own bits: the engine's fused q/k/v and gate/up are read only where it holds."""


FAST_OPS = Ops("fast", linear_reference, attention_reference, rms_norm_fast, log_softmax_reference,
               softmax_reference, torch.sigmoid, functools.partial(packed_attention_fast, attention_reference),
               rotary_fast, silu_mul_fast, lambda weight, sizes: True)
# Invariant packed attention gives each segment the bits of its padded row.
INVARIANT_OPS = Ops("invariant", invariant.linear, invariant.attention, invariant.rms_norm, invariant.log_softmax,
                    softmax_invariant, sigmoid_invariant, invariant.packed_attention, invariant.rotary,
                    invariant.silu_mul, invariant.fusion_agrees)
OPS = {"fast": FAST_OPS, "invariant": INVARIANT_OPS}


def set_alignment_mode(model: nn.Module, mode: AlignmentMode) -> None:
    """Route every matmul, attention, norm and log-softmax of `model` through `mode`'s kernels."""
    ops = OPS[mode]
    for module in model.modules():
        if hasattr(type(module), "ops"):
            module.ops = ops


def model_ops(model: nn.Module) -> Ops:
    """The kernels a model was set to (fast unless `set_alignment_mode` said otherwise)."""
    return getattr(model, "ops", FAST_OPS)
