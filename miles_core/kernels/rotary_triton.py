"""Rotate-half RoPE in one Triton kernel with eager PyTorch's bits, for the invariant engine.

Why: in `invariant` mode the engine and trainer must compute the same bits, so RoPE ran as eager
PyTorch (`elementwise.rotary_reference`: slice, negate, cat, two multiplies, an add: five kernels
per tensor, about 0.9 ms of a 9.5 ms decode step of the 0.6B shape at batch 256 on H100). This
kernel does the same arithmetic in one pass: each half-precision product is computed in fp32
(exact: two 8- or 11-bit significands) and rounded to the tensor's dtype, as eager rounds each
op's result, then the two rounded products are added in fp32 and rounded once more. Rounding
between the multiplies and the add also keeps the compiler from fusing them into an FMA. So the
output equals `rotary_reference` bit for bit (tested on GPU), whatever the batch, and the trainer
may keep the eager op. fp32 tensors stay eager (an fp32 multiply-add could be fused into an FMA),
and so does anything that needs a gradient (this kernel has no backward).

Shape legend: B batch, H heads, T tokens, D head dim (even).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rotary(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, cos/sin broadcast over heads; any strides in, contiguous out."""
    B, H, T, D = x_BHTD.shape
    cos, sin = cos_BTD.expand(B, T, D), sin_BTD.expand(B, T, D)  # stride 0 where cos is shared
    out = torch.empty((B, H, T, D), device=x_BHTD.device, dtype=x_BHTD.dtype)
    if out.numel():
        _rotary_kernel[(B * H * T,)](x_BHTD, cos, sin, out, H, T, *x_BHTD.stride(), *cos.stride(), *sin.stride(),
                                     HALF=D // 2, num_warps=1)
    return out


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, H, T, sxb, sxh, sxt, sxd, scb, sct, scd, ssb, sst, ssd,
                   HALF: tl.constexpr):
    row = tl.program_id(0)
    b, h, t = row // (H * T), (row // T) % H, row % T
    d = tl.arange(0, HALF)
    x = x_ptr + b * sxb + h * sxh + t * sxt
    lo = tl.load(x + d * sxd).to(tl.float32)
    hi = tl.load(x + (d + HALF) * sxd).to(tl.float32)
    c, s = cos_ptr + b * scb + t * sct, sin_ptr + b * ssb + t * sst
    c_lo, c_hi = tl.load(c + d * scd).to(tl.float32), tl.load(c + (d + HALF) * scd).to(tl.float32)
    s_lo, s_hi = tl.load(s + d * ssd).to(tl.float32), tl.load(s + (d + HALF) * ssd).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # rotate_half(x) = (-hi, lo); every product and the sum rounded to the tensor's dtype, as eager.
    first = (lo * c_lo).to(dtype).to(tl.float32) + (-hi * s_lo).to(dtype).to(tl.float32)
    second = (hi * c_hi).to(dtype).to(tl.float32) + (lo * s_hi).to(dtype).to(tl.float32)
    o = out_ptr + row * 2 * HALF
    tl.store(o + d, first.to(dtype))
    tl.store(o + HALF + d, second.to(dtype))
