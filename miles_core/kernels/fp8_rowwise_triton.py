"""Row-wise FP8 quantisation of a training GEMM's operand in Triton (`train.precision = "fp8"`).

Why: in eager PyTorch `quant.fp8_train.quantize_rowwise` is about seven full passes over an
operand (two fp32 casts, |x|, a row amax, a divide, a clamp, the e4m3 cast), and the backward
first copies three transposes (W^T, dL/dy^T, x^T) and pads the tokens; on an H200 a Qwen3-0.6B
training step in FP8 ran at 0.41x the bf16 step's throughput. Here each operand is read in its own
dtype and written once as e4m3 rows and their scales, rows being the operand's rows or its columns
(`columns=True`: the weight's input features for dL/dx, the output channels of dL/dy and the
input features of x for dL/dW), with the quantised dimension zero-padded to a multiple (`pad_to`:
the tokens of the weight gradient, as `_scaled_mm` needs), so no transpose is ever copied.

Two schedules, the same bits (a maximum does not depend on its order):
- `_rowwise_kernel`, where the rows alone give the card enough programs (the tokens of x and
  dL/dy): a program owns `BLOCK_R` whole rows and walks them twice, for the amax and for the
  values (the second walk mostly from L2);
- split (`_amax_kernel` then `_quantize_kernel`), where they do not and the rows are long (the
  columns of x and dL/dy, 8,192 tokens long in a micro-batch, but only 1,024-3,072 of them: 32-96
  programs of `BLOCK_R` rows, 162-198 us a call on an H200 against 57-124 us split): a 2-D grid
  of (rows, chunk of the row) tiles, the partial amaxes combined with an atomic max, then a 2-D
  grid that quantises. Short rows stay in one kernel: a Triton launch costs ~20 us of host time,
  and FP8 training at 0.6B shapes is bound by the host.

Bits: scale = amax / 448 (1 for an all-zero row) and values x / scale clamped to +-448 and
rounded to nearest even, both divisions in IEEE fp32 (`div_rn`; Triton's `/` is approximate),
as `quantize_rowwise` computes them (its amax / 448 through `quant.scales.divide_rounded`: a
plain `/ 448.0` is a product with the rounded reciprocal on CUDA, one ulp off in ~half the
rows). `quant.fp8_train` uses the kernels where a check on the device gives that function's bits
for both schedules (once per device and dtype), else the torch path.

Shape legend: R rows quantised (each with one scale), C their length, P = C padded.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = tl.constexpr(448.0)
BLOCK_R, BLOCK_C = 32, 128
"""`_rowwise_kernel`: rows per program and columns per step of its two walks along them."""
SPLIT_TILE = {False: (16, 128), True: (128, 16)}
"""Split schedule's (rows, columns) tile by `columns`: long along whichever is contiguous in memory."""
SPLIT_MIN_COLUMNS = 2048
"""Rows longer than this are split when too few (H200, 0.6B shapes: rows of 3,072 and 8,192 won,
rows of 1,024-2,048 lost to the launch overhead of the split's three kernels)."""
SPLIT_CHUNK = 512
"""Columns of a row one `_amax_kernel` program reduces (its partial amax is one atomic max)."""


def quantize_rows(t: torch.Tensor, *, columns: bool = False, pad_to: int = 1,
                  split: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 (R, P) row-major, fp32 scales (R, 1)) of the rows of 2-D `t`, or of its columns;
    `split` forces a schedule (None: the split one where the rows are too few for the card)."""
    src = t.t() if columns else t
    R, C = src.shape
    P = -(-C // pad_to) * pad_to
    q = torch.empty(R, P, device=t.device, dtype=FP8_DTYPE)
    scale = torch.empty(R, 1, device=t.device, dtype=torch.float32)
    if not R:
        return q, scale
    if split is None:  # a few programs walking long rows leave the card idle; short rows are not worth 3 launches
        split = triton.cdiv(R, BLOCK_R) < _sm_count(t.device) and C > SPLIT_MIN_COLUMNS
    if not split:
        _rowwise_kernel[(triton.cdiv(R, BLOCK_R),)](src, q, scale, R, C, P, src.stride(0), src.stride(1),
                                                   BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4)
        return q, scale
    tile_r, tile_c = SPLIT_TILE[columns]
    amax = torch.zeros(R, device=t.device, dtype=torch.float32)
    if C:
        _amax_kernel[(triton.cdiv(R, tile_r), triton.cdiv(C, SPLIT_CHUNK))](
            src, amax, R, C, src.stride(0), src.stride(1), BLOCK_R=tile_r, BLOCK_C=tile_c, CHUNK=SPLIT_CHUNK,
            num_warps=4)
    _quantize_kernel[(triton.cdiv(R, tile_r), triton.cdiv(P, tile_c))](
        src, amax, q, scale, R, C, P, src.stride(0), src.stride(1), BLOCK_R=tile_r, BLOCK_C=tile_c, num_warps=4)
    return q, scale


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _scale_of(amax):
    return tl.where(amax > 0, tl.div_rn(amax, FP8_MAX), 1.0)


@triton.jit
def _quantized(x, scale):
    return tl.minimum(tl.maximum(tl.div_rn(x.to(tl.float32), scale[:, None]), -FP8_MAX), FP8_MAX)


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
    scale = _scale_of(amax)
    tl.store(s_ptr + rows, scale, mask=rows < R)
    for start in range(0, P, BLOCK_C):  # padding columns read as 0 and are written as 0
        c = start + cols
        x = tl.load(x_ptr + rows[:, None] * s_r + c[None, :] * s_c, mask=in_rows & (c[None, :] < C), other=0.0)
        q = _quantized(x, scale)
        tl.store(q_ptr + rows[:, None] * P + c[None, :], q.to(q_ptr.dtype.element_ty), mask=in_rows & (c[None, :] < P))


@triton.jit
def _amax_kernel(x_ptr, amax_ptr, R, C, s_r, s_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 CHUNK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    first = tl.program_id(1) * CHUNK
    in_rows = rows[:, None] < R
    amax = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(0, CHUNK, BLOCK_C):
        c = first + start + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + rows[:, None] * s_r + c[None, :] * s_c, mask=in_rows & (c[None, :] < C), other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    tl.atomic_max(amax_ptr + rows, amax, mask=rows < R)  # amaxes are >= 0: any order, the same max


@triton.jit
def _quantize_kernel(x_ptr, amax_ptr, q_ptr, s_ptr, R, C, P, s_r, s_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_rows = rows[:, None] < R
    scale = _scale_of(tl.load(amax_ptr + rows, mask=rows < R, other=0.0))
    if tl.program_id(1) == 0:
        tl.store(s_ptr + rows, scale, mask=rows < R)
    x = tl.load(x_ptr + rows[:, None] * s_r + c[None, :] * s_c, mask=in_rows & (c[None, :] < C), other=0.0)
    q = _quantized(x, scale)
    tl.store(q_ptr + rows[:, None] * P + c[None, :], q.to(q_ptr.dtype.element_ty), mask=in_rows & (c[None, :] < P))
