"""Rotate-half RoPE in one Triton kernel, for `invariant` mode on CUDA, engine and trainer alike.

Why: eager RoPE (`elementwise.rotary_reference`: slice, negate, cat, two multiplies, an add) is
five kernels per tensor; in an H100 profile it was most of what separated an invariant decode
step from a fast one (1.34x / 1.26x the time at batch 64 / 256, against 1.08x with one kernel).
Invariant mode only needs the engine and the trainer to compute the same bits, not eager's
bits: so both run this kernel, the trainer's forward through an autograd Function. The kernel
is elementwise (a row's result never depends on the batch) and computes in fp32 with one
rounding at the end.

Backward: RoPE is linear in x, and its transpose is RoPE again with the sine table's halves
swapped and negated (for x = (lo, hi): out = (lo c1 - hi s1, hi c2 + lo s2), so
dL/dlo = g1 c1 + g2 s2 and dL/dhi = g2 c2 - g1 s1), so the gradient is one more launch of the
same kernel on the (B, T, D) tables' transform. Gradients need no invariance.

Shape legend: B batch, H heads, T tokens, D head dim (even).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rotary(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, cos/sin broadcast over heads; differentiable in x."""
    return _Rotary.apply(x_BHTD, cos_BTD, sin_BTD)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BHTD, cos_BTD, sin_BTD):
        ctx.save_for_backward(cos_BTD, sin_BTD)
        return _launch(x_BHTD, cos_BTD, sin_BTD)

    @staticmethod
    def backward(ctx, grad_BHTD):
        cos_BTD, sin_BTD = ctx.saved_tensors
        half = sin_BTD.shape[-1] // 2
        transposed_sin = -torch.cat((sin_BTD[..., half:], sin_BTD[..., :half]), dim=-1)
        return _launch(grad_BHTD, cos_BTD, transposed_sin), None, None


def _launch(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """Any strides in (q and k arrive as transposed views of the projections), contiguous out."""
    B, H, T, D = x_BHTD.shape
    cos, sin = cos_BTD.expand(B, T, D), sin_BTD.expand(B, T, D)  # stride 0 where the batch shares a table
    out = torch.empty((B, H, T, D), device=x_BHTD.device, dtype=x_BHTD.dtype)
    if out.numel():
        _rotary_kernel[(B * H * T,)](x_BHTD, cos, sin, out, H, T, *x_BHTD.stride(), *cos.stride(), *sin.stride(),
                                     HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2), num_warps=1)
    return out


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, T, sxb, sxh, sxt, sxd, scb, sct, scd, ssb, sst, ssd,
                   HALF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b, h, t = row // (H * T), (row // T) % H, row % T
    d = tl.arange(0, BLOCK)
    inside = d < HALF
    x = x_ptr + b * sxb + h * sxh + t * sxt
    lo = tl.load(x + d * sxd, mask=inside, other=0.0).to(tl.float32)
    hi = tl.load(x + (d + HALF) * sxd, mask=inside, other=0.0).to(tl.float32)
    c, s = cos_ptr + b * scb + t * sct, sin_ptr + b * ssb + t * sst
    c_lo = tl.load(c + d * scd, mask=inside, other=0.0).to(tl.float32)
    c_hi = tl.load(c + (d + HALF) * scd, mask=inside, other=0.0).to(tl.float32)
    s_lo = tl.load(s + d * ssd, mask=inside, other=0.0).to(tl.float32)
    s_hi = tl.load(s + (d + HALF) * ssd, mask=inside, other=0.0).to(tl.float32)
    o = out_ptr + row * 2 * HALF
    dtype = out_ptr.dtype.element_ty
    tl.store(o + d, (lo * c_lo - hi * s_lo).to(dtype), mask=inside)  # rotate_half(x) = (-hi, lo)
    tl.store(o + HALF + d, (hi * c_hi + lo * s_hi).to(dtype), mask=inside)
