"""Row-wise FP8 quantisation of a training GEMM's operand in one Triton kernel (`train.precision = "fp8"`).

Why: in eager PyTorch `quant.fp8_train.quantize_rowwise` is about seven full passes over an
operand (two fp32 casts, |x|, a row amax, a divide, a clamp, the e4m3 cast), and the backward
first copies three transposes (W^T, dL/dy^T, x^T) and pads the tokens; on an H200 a Qwen3-0.6B
training step in FP8 ran at 0.41x the bf16 step's throughput. This kernel reads the operand in
its own dtype twice (the row amax, then the quantised values) and writes the e4m3 rows and their
scales once, rows being the operand's rows or its columns (`columns=True`: the weight's input
features for dL/dx, the output channels of dL/dy and the input features of x for dL/dW), with
the quantised dimension zero-padded to a multiple (`pad_to`: the tokens of the weight gradient,
as `_scaled_mm` needs), so each `_scaled_mm` operand costs one launch and no transpose copy.

Bits: scale = amax / 448 (1 for an all-zero row) and values x / scale clamped to +-448 and
rounded to nearest even, both divisions in IEEE fp32 (`div_rn`; Triton's `/` is approximate),
as `quantize_rowwise` computes them (its amax / 448 through `quant.scales.divide_rounded`: a
plain `/ 448.0` is a product with the rounded reciprocal on CUDA, one ulp off in ~half the
rows). `quant.fp8_train` uses the kernel where a check on the device gives that function's bits
(once per device and dtype), else the torch path.

Shape legend: R rows quantised (each with one scale), C their length, P = C padded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = tl.constexpr(448.0)
BLOCK_R, BLOCK_C = 32, 128
"""Rows per program and columns per step of its two walks along them."""


def quantize_rows(t: torch.Tensor, *, columns: bool = False, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 (R, P) row-major, fp32 scales (R, 1)) of the rows of 2-D `t`, or of its columns."""
    src = t.t() if columns else t
    R, C = src.shape
    P = -(-C // pad_to) * pad_to
    q = torch.empty(R, P, device=t.device, dtype=FP8_DTYPE)
    scale = torch.empty(R, 1, device=t.device, dtype=torch.float32)
    if R:
        _rowwise_kernel[(triton.cdiv(R, BLOCK_R),)](src, q, scale, R, C, P, src.stride(0), src.stride(1),
                                                   BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4)
    return q, scale


@triton.jit
def _rowwise_kernel(x_ptr, q_ptr, s_ptr, R, C, P, s_r, s_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    in_rows = rows[:, None] < R
    amax = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, C, BLOCK_C):
        c = start + cols
        x = tl.load(x_ptr + rows[:, None] * s_r + c[None, :] * s_c, mask=in_rows & (c[None, :] < C), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.where(amax > 0, tl.div_rn(amax, FP8_MAX), 1.0)
    tl.store(s_ptr + rows, scale, mask=rows < R)
    for start in range(0, P, BLOCK_C):  # padding columns read as 0 and are written as 0
        c = start + cols
        x = tl.load(x_ptr + rows[:, None] * s_r + c[None, :] * s_c, mask=in_rows & (c[None, :] < C), other=0.0)
        q = tl.minimum(tl.maximum(tl.div_rn(x.to(tl.float32), scale[:, None]), -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + rows[:, None] * P + c[None, :], q.to(q_ptr.dtype.element_ty), mask=in_rows & (c[None, :] < P))
