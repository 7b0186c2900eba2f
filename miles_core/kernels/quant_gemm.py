"""Quantised GEMMs for the engine: block FP8 (W8A8) and group INT4 (W4A16), each a Triton kernel
for CUDA next to a pure-torch reference with the same signature.

FP8 (DeepSeek-V3 / SGLang `w8a8_block_fp8_matmul`). Weight W (N, K) in e4m3fn with fp32
`weight_scale_inv` s_w per 128 x 128 block (R = ceil(N/128), C = ceil(K/128)). Activations are
quantised on the fly per token and group of 128 inputs: s_a = amax(|x_group|) / 448 (1 for an
all-zero group), x_q = e4m3fn(x / s_a). Then
    y[m, n] = sum over k-blocks c of (x_q[m, c] . W_q[n, c]) * s_a[m, c] * s_w[n // 128, c]
accumulated in fp32 and cast to x's dtype. e4m3 products are exact in fp32, so the reference
(dequantise both operands to fp32, one matmul) and the kernel differ only in summation order.
The activation quantisation is one torch function shared by both paths (`quantize_fp8_groups`),
so both see the same e4m3 integers.

INT4 (compressed-tensors `pack-quantized`, symmetric, W4A16). `weight_packed` int32 (N, K/8),
value i of a word in bits 4i..4i+3, offset by 8; `weight_scale` (N, K/g) in the weight's dtype.
The weight is W = (nibble - 8) * s, rounded to the scale's dtype, then to the activations'
dtype (exactly what dequantise-on-load computes), and y = x W^T with fp32 accumulation.

Both kernels run one fixed tile configuration for every problem size (no autotune, no split-K),
K walked from 0 in fixed steps, masks at the M, N and K edges: a row's result does not depend on
how many rows share the launch. The references live here rather than in `quant/` because
kernels sit below it; `quant/fp8.py` and `quant/int4.py` own the checkpoint-side math, and the
tests check the two agree.

Shape legend: M rows (tokens), N out features, K in features, R x C weight block grid, G groups.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references are used instead
    triton = None

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_BLOCK = 128
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): one configuration for every size (see module doc).
# FP8: BLOCK_K equals the 128-wide scale block (one activation and one weight scale per step),
# BLOCK_N 128 one weight block row, as SGLang's default block-FP8 config.
FP8_CONFIG = (64, 128, FP8_BLOCK, 4, 3)
# INT4: BLOCK_K 32 divides every group size (32, 64, 128).
INT4_CONFIG = (64, 64, 32, 4, 3)


@functools.cache
def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- FP8 -----------------------------------------------------------------------------------
def quantize_fp8_groups(x_MK: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn x (M, K), fp32 scales (M, ceil(K/group))): per-token, per-group dynamic scaling."""
    M, K = x_MK.shape
    C = _cdiv(K, group)
    padded = x_MK.new_zeros((M, C * group), dtype=torch.float32)
    padded[:, :K] = x_MK.float()  # zero padding never raises a group's amax
    amax_MC = padded.view(M, C, group).abs().amax(-1)
    scale_MC = torch.where(amax_MC > 0, amax_MC / FP8_MAX, torch.ones_like(amax_MC))
    q = (padded.view(M, C, group) / scale_MC[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(M, C * group)[:, :K].contiguous(), scale_MC


def _expand_blocks(scale_RC: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    return scale_RC.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]


def _check_fp8(x: torch.Tensor, weight_NK: torch.Tensor, scale_RC: torch.Tensor) -> None:
    if weight_NK.dtype != FP8_DTYPE or weight_NK.ndim != 2:
        raise ValueError(f"fp8 linear needs a 2-D {FP8_DTYPE} weight, got {weight_NK.dtype} {tuple(weight_NK.shape)}")
    grid = (_cdiv(weight_NK.shape[0], FP8_BLOCK), _cdiv(weight_NK.shape[1], FP8_BLOCK))
    if tuple(scale_RC.shape) != grid:
        raise ValueError(f"weight_scale_inv of a {tuple(weight_NK.shape)} weight must be {grid}, got {tuple(scale_RC.shape)}")
    if x.shape[-1] != weight_NK.shape[1]:
        raise ValueError(f"fp8 linear: input has {x.shape[-1]} features, weight expects {weight_NK.shape[1]}")


def fp8_block_linear_reference(x: torch.Tensor, weight_NK: torch.Tensor, scale_RC: torch.Tensor,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = dequant(quant(x)) dequant(W)^T (+ b) in fp32, cast to x's dtype."""
    _check_fp8(x, weight_NK, scale_RC)
    x_MK = x.reshape(-1, x.shape[-1])
    q_MK, s_MC = quantize_fp8_groups(x_MK)
    M, K = x_MK.shape
    x_deq = q_MK.float() * s_MC.repeat_interleave(FP8_BLOCK, 1)[:, :K]
    w_deq = weight_NK.float() * _expand_blocks(scale_RC.float(), *weight_NK.shape, FP8_BLOCK)
    y = F.linear(x_deq, w_deq, None if bias is None else bias.float())
    return y.to(x.dtype).view(*x.shape[:-1], weight_NK.shape[0])


def fp8_block_linear(x: torch.Tensor, weight_NK: torch.Tensor, scale_RC: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel on CUDA for bf16/fp16 activations, the reference elsewhere (same
    signature and math; fp32 activations missed the fp32 tolerance on H100 at M >= 128)."""
    if not (available() and x.is_cuda) or x.dtype == torch.float32:
        return fp8_block_linear_reference(x, weight_NK, scale_RC, bias)
    _check_fp8(x, weight_NK, scale_RC)
    x_MK = x.reshape(-1, x.shape[-1])
    q_MK, s_MC = quantize_fp8_groups(x_MK)
    M, K = q_MK.shape
    N = weight_NK.shape[0]
    w, s_w = weight_NK.contiguous(), scale_RC.float().contiguous()
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k, warps, stages = FP8_CONFIG
    grid = (_cdiv(M, block_m), _cdiv(N, block_n))
    _fp8_kernel[grid](q_MK, s_MC, w, s_w, bias if bias is not None else out, out, M, N, K,
                      q_MK.stride(0), s_MC.stride(0), w.stride(0), s_w.stride(0), out.stride(0),
                      HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                      num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], N)


# ---- INT4 ----------------------------------------------------------------------------------
def _check_int4(x: torch.Tensor, packed_NP: torch.Tensor, scale_NG: torch.Tensor) -> tuple[int, int, int]:
    if packed_NP.dtype != torch.int32 or packed_NP.ndim != 2:
        raise ValueError(f"int4 linear needs 2-D int32 packed words, got {packed_NP.dtype} {tuple(packed_NP.shape)}")
    N, K = packed_NP.shape[0], packed_NP.shape[1] * 8
    if scale_NG.ndim != 2 or scale_NG.shape[0] != N or scale_NG.shape[1] < 1 or K % scale_NG.shape[1]:
        raise ValueError(f"weight_scale of a {(N, K)} weight must be (N, K / group size), got {tuple(scale_NG.shape)}")
    if x.shape[-1] != K:
        raise ValueError(f"int4 linear: input has {x.shape[-1]} features, weight expects {K}")
    return N, K, K // scale_NG.shape[1]


def dequantize_int4_packed(packed_NP: torch.Tensor, scale_NG: torch.Tensor) -> torch.Tensor:
    """(nibble - 8) * s per group, in the scale's dtype (compressed-tensors' decompression)."""
    N, P = packed_NP.shape
    shifts = torch.arange(8, device=packed_NP.device, dtype=torch.int32) * 4
    q_NK = ((packed_NP[..., None] >> shifts) & 0xF).view(N, P * 8) - 8  # arithmetic shift; & 0xF drops the sign
    G = scale_NG.shape[1]
    return (q_NK.view(N, G, -1).to(scale_NG.dtype) * scale_NG[..., None]).view(N, P * 8)


def int4_group_linear_reference(x: torch.Tensor, packed_NP: torch.Tensor, scale_NG: torch.Tensor,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x dequant(W)^T (+ b) in x's dtype (the weight dequantised as on load)."""
    _check_int4(x, packed_NP, scale_NG)
    weight = dequantize_int4_packed(packed_NP, scale_NG).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def int4_group_linear(x: torch.Tensor, packed_NP: torch.Tensor, scale_NG: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel on CUDA, the reference elsewhere (same signature and math)."""
    if not (available() and x.is_cuda):
        return int4_group_linear_reference(x, packed_NP, scale_NG, bias)
    N, K, group = _check_int4(x, packed_NP, scale_NG)
    x_MK = x.reshape(-1, K).contiguous()
    M = x_MK.shape[0]
    packed, scale = packed_NP.contiguous(), scale_NG.contiguous()
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k, warps, stages = INT4_CONFIG
    grid = (_cdiv(M, block_m), _cdiv(N, block_n))
    _int4_kernel[grid](x_MK, packed, scale, bias if bias is not None else out, out, M, N, K,
                       x_MK.stride(0), packed.stride(0), scale.stride(0), out.stride(0),
                       GROUP=group, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out.view(*x.shape[:-1], N)


if triton is not None:

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
    def _int4_kernel(x_ptr, wp_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_cm,
                     GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < M, cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            k_ok = k < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wk_mask = k_ok[:, None] & col_ok[None, :]
            words = tl.load(wp_ptr + cols[None, :] * stride_wn + (k // 8)[:, None], mask=wk_mask, other=0)
            nibbles = (words >> ((k % 8) * 4)[:, None]) & 0xF  # (BLOCK_K, BLOCK_N)
            s = tl.load(s_ptr + cols[None, :] * stride_sn + (k // GROUP)[:, None], mask=wk_mask, other=0.0)
            # Rounded to the scale's dtype first, as dequantise-on-load does, then to x's.
            w = ((nibbles - 8).to(tl.float32) * s.to(tl.float32)).to(s_ptr.dtype.element_ty).to(x_ptr.dtype.element_ty)
            if IEEE:
                acc = tl.dot(x, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
