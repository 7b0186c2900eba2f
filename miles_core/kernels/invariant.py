"""The batch-invariant ops, chosen per call: the Triton kernels (`triton_linear`, `triton_ops`,
`rotary_triton`, `swiglu_triton`) for CUDA tensors when Triton is installed, else the plain-PyTorch invariant
variants (`matmul`, `attention`, `norms`, `packed`, eager RoPE). Both give a row's result independent of the batch;
they are not bitwise equal to each other, so engine and trainer must run on the same kind of
device to agree.
"""

from __future__ import annotations

import torch

from miles_core.kernels import triton_linear, triton_ops
from miles_core.kernels.attention import attention_invariant
from miles_core.kernels.elementwise import rotary_reference, silu_mul_reference
from miles_core.kernels.matmul import linear_invariant
from miles_core.kernels.norms import log_softmax_invariant, rms_norm_invariant
from miles_core.kernels.packed import PackedSegments, segment_attention

try:
    from miles_core.kernels import rotary_triton, swiglu_triton
except ImportError:  # no Triton: eager RoPE and SwiGLU, which are elementwise and so invariant already
    rotary_triton = swiglu_triton = None


def _triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and triton_ops.available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if _triton(x):
        lead = x.shape[:-1]
        return triton_linear.linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*lead, weight.shape[0])
    return linear_invariant(x, weight, bias)


def fusion_agrees(fused_NK: torch.Tensor, sizes: tuple[int, ...]) -> bool:
    """Whether a stacked weight's linear gives each block's own bits (Triton, checked on the device);
    the torch path is never asked (the engine fuses on CUDA only) and says no."""
    return _triton(fused_NK) and triton_linear.fusion_agrees(fused_NK, sizes)


def attention(q_BHTD, k_BKSD, v_BKSD, position_ids_BT, cached: bool) -> torch.Tensor:
    if _triton(q_BHTD):
        return triton_ops.attention(q_BHTD, k_BKSD, v_BKSD, position_ids_BT)
    return attention_invariant(q_BHTD, k_BKSD, v_BKSD, position_ids_BT, cached)


def packed_attention(q_1HTD, k_1KTD, v_1KTD, position_ids_1T, packed: PackedSegments) -> torch.Tensor:
    """A packed row: one Triton launch over all segments, else one invariant call per segment
    (both give each token the bits of its padded row)."""
    if _triton(q_1HTD):
        return triton_ops.packed_attention(q_1HTD, k_1KTD, v_1KTD, position_ids_1T, packed)
    return segment_attention(attention, q_1HTD, k_1KTD, v_1KTD, position_ids_1T, packed)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return triton_ops.rms_norm(x, weight, eps) if _triton(x) else rms_norm_invariant(x, weight, eps)


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    return triton_ops.log_softmax(z) if _triton(z) else log_softmax_invariant(z)


def rotary(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """One Triton kernel on CUDA (engine and trainer run the same one, so they agree bit for bit;
    not eager's bits), eager RoPE elsewhere."""
    if _triton(x_BHTD) and rotary_triton is not None:
        return rotary_triton.rotary(x_BHTD, cos_BTD, sin_BTD)
    return rotary_reference(x_BHTD, cos_BTD, sin_BTD)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """One Triton kernel on CUDA (engine and trainer alike; not eager's bits), eager elsewhere."""
    if _triton(gate) and swiglu_triton is not None:
        return swiglu_triton.silu_mul(gate, up)
    return silu_mul_reference(gate, up)
