"""Triton kernels behind `quant_gemm`: per-token-group FP8 activation quantisation, the block-FP8
(W8A8) GEMM, the group-INT4 (W4A16) GEMM, and INT4 dequantisation to a dense weight.

Why our own kernels: torch has no W4A16 GEMM, and its block-scaled FP8 GEMM (`F.scaled_mm` with
1x128 / 128x128 scales, used by `quant_gemm` for large M where the card supports it) needs the
activations quantised first, which in plain torch takes ten small kernels (about 20 us a call on
H100, more than the GEMM itself at decode sizes).

Tiles are picked by the number of rows M (`fp8_tiles`, `int4_tiles`): decode-sized calls get
narrow tiles so the few programs of a (M, N) grid still cover the card. The K walk is fixed (one
128-wide scale block per FP8 step, one quantisation group per INT4 step), and nothing is split
across programs, so results repeat run to run for the same M; they may differ in the last bits
between M classes, as cuBLAS's do (these run only in `fast` alignment mode; `invariant` mode
dequantises and uses the batch-invariant linear).

Bitwise contracts, checked by the GPU tests against the torch references of `quant_gemm`:
- `quantize_fp8_groups` equals `quant_gemm.quantize_fp8_groups`: scale = amax times the fp32
  reciprocal of 448, x / scale in IEEE fp32 (`div_rn`: Triton's `/` is an approximate division),
  round-to-nearest-even to e4m3;
- `dequantize_int4` equals `quant_gemm.dequantize_int4_packed(...).to(dtype)`: (nibble - 8) * s
  is exact in fp32, rounded once to the scale's dtype, then to the activations'.

Shape legend: M rows, N out features, K in features, C = K / 128 scale groups, P = K / 8 words.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_BLOCK = 128
FP8_MAX = tl.constexpr(448.0)  # constexprs: jit functions may read only those globals
INV_FP8_MAX = tl.constexpr(float(torch.tensor(1 / 448.0, dtype=torch.float32)))  # exact in fp32


# Tiles timed on H100 (2026-11-28) over the 0.6B / 4B / 30B-A3B-expert shapes, graph-replayed:
# narrow N tiles win at decode sizes (more programs over the card). BLOCK_M 16 runs the
# tensor cores' mma instructions with exact fp32 accumulation; BLOCK_M >= 64 runs Hopper's wgmma,
# whose FP8 accumulation inside one 128-wide K block is less precise (about 3e-4 relative).
def fp8_tiles(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages); BLOCK_K is the 128-wide scale block."""
    if M <= 16:
        return 16, 16, 2, 4
    if M <= 64:
        return 64, 16, 4, 4
    if M <= 256:
        return 64, 64, 4, 4
    return 128, 128, 8, 3


def int4_tiles(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages); BLOCK_K is the quantisation group."""
    if M <= 16:
        return 16, 16, 2, 4
    if M <= 64:
        return 64, 32, 4, 3
    return 64, 64, 4, 4


def quantize_fp8_groups(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn (M, K), fp32 scales (M, C)) of a contiguous 2-D CUDA tensor, one pass."""
    M, K = x_MK.shape
    C = triton.cdiv(K, FP8_BLOCK)
    q = torch.empty(M, K, device=x_MK.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(M, C, device=x_MK.device, dtype=torch.float32)
    if M:
        _act_quant_kernel[(M, C)](x_MK, q, scale, K, x_MK.stride(0), q.stride(0), scale.stride(0),
                                  GROUP=FP8_BLOCK, num_warps=1)
    return q, scale


def fp8_gemm(q_MK, s_MC, w_NK, s_RC, bias, out_dtype) -> torch.Tensor:
    M, K = q_MK.shape
    N = w_NK.shape[0]
    out = torch.empty(M, N, device=q_MK.device, dtype=out_dtype)
    block_m, block_n, warps, stages = fp8_tiles(M)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp8_kernel[grid](q_MK, s_MC, w_NK, s_RC, bias if bias is not None else out, out, M, N, K,
                      q_MK.stride(0), s_MC.stride(0), w_NK.stride(0), s_RC.stride(0), out.stride(0),
                      HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=FP8_BLOCK,
                      num_warps=warps, num_stages=stages)
    return out


def int4_gemm(x_MK, packed_NP, scale_NG, bias, group: int) -> torch.Tensor:
    M, K = x_MK.shape
    N = packed_NP.shape[0]
    out = torch.empty(M, N, device=x_MK.device, dtype=x_MK.dtype)
    block_m, block_n, warps, stages = int4_tiles(M)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _int4_kernel[grid](x_MK, packed_NP, scale_NG, bias if bias is not None else out, out, M, N, K,
                       x_MK.stride(0), packed_NP.stride(0), scale_NG.stride(0), out.stride(0),
                       GROUP=group, HAS_BIAS=bias is not None, IEEE=x_MK.dtype == torch.float32,
                       BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out


def dequantize_int4(packed_NP: torch.Tensor, scale_NG: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense (N, K) weight in `dtype` (for large-M calls, which then run cuBLAS)."""
    N, P = packed_NP.shape
    K = P * 8
    out = torch.empty(N, K, device=packed_NP.device, dtype=dtype)
    group = K // scale_NG.shape[1]
    _int4_dequant_kernel[(N, triton.cdiv(K, 1024))](packed_NP, scale_NG, out, K, packed_NP.stride(0),
                                                     scale_NG.stride(0), out.stride(0), GROUP=group, BLOCK=1024)
    return out


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, GROUP: tl.constexpr):
    row, c = tl.program_id(0), tl.program_id(1)
    k = c * GROUP + tl.arange(0, GROUP)
    x = tl.load(x_ptr + row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0, amax * INV_FP8_MAX, 1.0)  # as torch on CUDA: times the fp32 reciprocal
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * stride_qm + k, q.to(tl.float8e4nv), mask=k < K)
    tl.store(s_ptr + row * stride_sm + c, scale)


@triton.jit
def _fp8_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K,
                stride_am, stride_asm, stride_wn, stride_wsn, stride_cm,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + ks
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :], mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None], mask=col_ok[None, :] & (k[:, None] < K), other=0.0)
        a_s = tl.load(as_ptr + rows * stride_asm + kb, mask=row_ok, other=1.0)
        w_s = tl.load(ws_ptr + (cols // BLOCK_K) * stride_wsn + kb, mask=col_ok, other=1.0)  # 128-row weight blocks
        acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _unpack_group(wp_ptr, s_ptr, cols, col_ok, k0, stride_wn, stride_sn, GROUP: tl.constexpr,
                  BLOCK_N: tl.constexpr, out_dtype: tl.constexpr):
    """One group of the weight as (GROUP, BLOCK_N) in `out_dtype`: each int32 word loaded once and
    split into its 8 nibbles (value i in bits 4i..4i+3 is input k0 + 8 * word + i)."""
    words = tl.load(wp_ptr + cols[None, :] * stride_wn + (k0 // 8 + tl.arange(0, GROUP // 8))[:, None],
                    mask=col_ok[None, :], other=0)  # (GROUP / 8, BLOCK_N)
    shifts = tl.arange(0, 8) * 4
    nibbles = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # (GROUP / 8, 8, BLOCK_N)
    nibbles = tl.reshape(nibbles, (GROUP, BLOCK_N))
    s = tl.load(s_ptr + cols * stride_sn + k0 // GROUP, mask=col_ok, other=0.0)
    # Rounded to the scale's dtype first, as dequantise-on-load does, then to the output's.
    return ((nibbles - 8).to(tl.float32) * s.to(tl.float32)[None, :]).to(s_ptr.dtype.element_ty).to(out_dtype)


@triton.jit
def _int4_kernel(x_ptr, wp_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_cm,
                 GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, GROUP):  # K is a multiple of the group (checked by the caller)
        k = k0 + tl.arange(0, GROUP)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None], other=0.0)
        w = _unpack_group(wp_ptr, s_ptr, cols, col_ok, k0, stride_wn, stride_sn, GROUP, BLOCK_N,
                          x_ptr.dtype.element_ty)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _int4_dequant_kernel(wp_ptr, s_ptr, out_ptr, K, stride_wn, stride_sn, stride_on, GROUP: tl.constexpr,
                         BLOCK: tl.constexpr):
    n, kb = tl.program_id(0), tl.program_id(1)
    k = kb * BLOCK + tl.arange(0, BLOCK)
    ok = k < K
    words = tl.load(wp_ptr + n * stride_wn + k // 8, mask=ok, other=0)
    s = tl.load(s_ptr + n * stride_sn + k // GROUP, mask=ok, other=0.0)
    w = ((((words >> ((k % 8) * 4)) & 0xF) - 8).to(tl.float32) * s.to(tl.float32)).to(s_ptr.dtype.element_ty)
    tl.store(out_ptr + n * stride_on + k, w.to(out_ptr.dtype.element_ty), mask=ok)
