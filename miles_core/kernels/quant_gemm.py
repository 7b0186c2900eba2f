"""Quantised GEMMs for the engine: block FP8 (W8A8) and group INT4 (W4A16), each a Triton kernel
for CUDA next to a pure-torch reference with the same signature.

FP8 (DeepSeek-V3 / SGLang `w8a8_block_fp8_matmul`). Weight W (N, K) in e4m3fn with fp32
`weight_scale_inv` s_w per 128 x 128 block (R = ceil(N/128), C = ceil(K/128)). Activations are
quantised on the fly per token and group of 128 inputs: s_a = amax(|x_group|) times 1/448
rounded to fp32 (1 for an all-zero group), x_q = e4m3fn(x / s_a). Then
    y[m, n] = sum over k-blocks c of (x_q[m, c] . W_q[n, c]) * s_a[m, c] * s_w[n // 128, c]
accumulated in fp32 and cast to x's dtype. e4m3 products are exact in fp32, so the reference
(dequantise both operands to fp32, one matmul) and the kernel differ only in summation order.
The activation quantisation (`quantize_fp8_groups` here, its Triton twin on CUDA: equal bitwise)
gives both the same e4m3 integers.

INT4 (compressed-tensors `pack-quantized`, symmetric, W4A16). `weight_packed` int32 (N, K/8),
value i of a word in bits 4i..4i+3, offset by 8; `weight_scale` (N, K/g) in the weight's dtype.
The weight is W = (nibble - 8) * s, rounded to the scale's dtype, then to the activations'
dtype (exactly what dequantise-on-load computes), and y = x W^T with fp32 accumulation.

On CUDA (bf16/fp16 activations): the activations are quantised by one Triton kernel
(`quant_triton.quantize_fp8_groups`); FP8 calls of more than `LARGE_M` rows run torch's
block-scaled `F.scaled_mm` (cuBLAS, sm90) when a check at first use on the device agrees with
the reference, else the Triton GEMM; INT4 calls of more than `INT4_DEQUANT_M` rows dequantise
the weight (Triton) and run cuBLAS, which is then exactly the reference. Smaller calls (decode)
run the fused Triton GEMMs on tiles picked by M (`quant_triton`). These paths serve only
`fast` alignment mode; results repeat run to run, and like cuBLAS's may differ in the last bits
between row counts. The references live here rather than in `quant/` because kernels sit below
it; `quant/fp8.py` and `quant/int4.py` own the checkpoint-side math, and the tests check the two
agree.

Shape legend: M rows (tokens), N out features, K in features, R x C weight block grid, G groups.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:
    from miles_core.kernels import quant_triton
except ImportError:  # CPU-only installs (no Triton): the references are used instead
    quant_triton = None

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
INV_FP8_MAX = float(torch.tensor(1 / FP8_MAX, dtype=torch.float32))  # 1/448 rounded to fp32
FP8_BLOCK = 128
LARGE_M = 256
"""FP8 calls with more rows (prefill, training-sized) leave the fused kernel for cuBLAS."""
INT4_DEQUANT_M = 64
"""INT4 calls with more rows dequantise and run cuBLAS (faster from 128 rows on H100)."""
_scaled_mm_ok: dict[torch.device, bool] = {}


@functools.cache
def available() -> bool:
    return quant_triton is not None and torch.cuda.is_available()


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
    # Times the fp32 reciprocal, written out: torch on CUDA turns a division by a scalar into that
    # product (on CPU it divides), and the Triton kernel must give the same bits on both.
    scale_MC = torch.where(amax_MC > 0, amax_MC * INV_FP8_MAX, torch.ones_like(amax_MC))
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
    """The CUDA kernels for bf16/fp16 activations, the reference elsewhere (same signature and
    math; fp32 activations missed the fp32 tolerance on H100 at M >= 128)."""
    if not (available() and x.is_cuda) or x.dtype == torch.float32:
        return fp8_block_linear_reference(x, weight_NK, scale_RC, bias)
    _check_fp8(x, weight_NK, scale_RC)
    x_MK = x.reshape(-1, x.shape[-1]).contiguous()
    q_MK, s_MC = quant_triton.quantize_fp8_groups(x_MK)
    w, s_w = weight_NK.contiguous(), scale_RC.float().contiguous()
    out = None
    if q_MK.shape[0] > LARGE_M and _scaled_mm_agrees(x.device, x.dtype):
        out = _scaled_mm_block(q_MK, s_MC, w, s_w, x.dtype)
    if out is None:
        out = quant_triton.fp8_gemm(q_MK, s_MC, w, s_w, bias, x.dtype)
    elif bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight_NK.shape[0])


def _scaled_mm_block(q_MK, s_MC, w_NK, s_RC, dtype) -> torch.Tensor | None:
    """torch's block-scaled GEMM (1x128 activation, 128x128 weight scales), or None where it does
    not take this problem: it needs N and K multiples of 128 (sm90 cuBLAS), M a multiple of 4 (the
    rows are zero-padded), activation scales outer-dim major and the weight's K blocks padded to
    a multiple of 4."""
    M, K = q_MK.shape
    N = w_NK.shape[0]
    if N % FP8_BLOCK or K % FP8_BLOCK or not hasattr(F, "scaled_mm"):
        return None
    pad = -M % 4
    if pad:
        q_MK, s_MC = F.pad(q_MK.view(torch.uint8), (0, 0, 0, pad)).view(FP8_DTYPE), F.pad(s_MC, (0, 0, 0, pad), value=1.0)
    s_RC = F.pad(s_RC, (0, -s_RC.shape[1] % 4), value=1.0)
    out = F.scaled_mm(q_MK, w_NK.t(), s_MC.t().contiguous().t(), F.ScalingType.BlockWise1x128, s_RC.t(),
                      F.ScalingType.BlockWise128x128, output_dtype=dtype)
    return out[:M]


def _scaled_mm_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `F.scaled_mm` runs block scales on this device and gives the reference's result
    (relative 1e-2 of the output's largest value, a bf16 rounding budget), checked once."""
    ok = _scaled_mm_ok.get(device)
    if ok is None:
        gen = torch.Generator(device=device).manual_seed(0)
        q_w = (torch.randn(256, 512, generator=gen, device=device) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        s_w = torch.rand(2, 4, generator=gen, device=device) * 1e-3 + 1e-4  # distinct per block
        x = torch.randn(258, 512, generator=gen, device=device).to(dtype)  # M not a multiple of 4
        q_x, s_x = quant_triton.quantize_fp8_groups(x)
        try:
            out = _scaled_mm_block(q_x, s_x, q_w, s_w, dtype)
        except (RuntimeError, TypeError, ValueError, AttributeError):  # a torch or card without block scales
            out = None
        ref = fp8_block_linear_reference(x, q_w, s_w).float()
        ok = out is not None and bool((out.float() - ref).abs().max() <= 1e-2 * ref.abs().max())
        _scaled_mm_ok[device] = ok
    return ok


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
    """The CUDA kernels, the reference elsewhere (same signature and math; calls of more than
    `INT4_DEQUANT_M` rows dequantise on the device and equal the reference bitwise)."""
    if not (available() and x.is_cuda):
        return int4_group_linear_reference(x, packed_NP, scale_NG, bias)
    N, K, group = _check_int4(x, packed_NP, scale_NG)
    x_MK = x.reshape(-1, K).contiguous()
    packed, scale = packed_NP.contiguous(), scale_NG.contiguous()
    if x_MK.shape[0] > INT4_DEQUANT_M or group not in (32, 64, 128):  # the fused kernel steps one group a time
        weight = quant_triton.dequantize_int4(packed, scale, x.dtype)
        out = F.linear(x_MK, weight, None if bias is None else bias.to(x.dtype))
    else:
        out = quant_triton.int4_gemm(x_MK, packed, scale, bias, group)
    return out.view(*x.shape[:-1], N)
