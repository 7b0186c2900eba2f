"""Block-wise FP8 (e4m3) weight quantisation, the DeepSeek-V3 / Qwen3-FP8 checkpoint format.

Math. A weight W (N out, K in) is cut into 128 x 128 blocks (the last row / column of blocks may
be partial: the grid is ceil(N/128) x ceil(K/128), as SGLang and vLLM read it). Each block b gets
one fp32 scale s_b = amax(|W_b|) / 448 (448 = the largest finite e4m3fn value) and is stored as
Q_b = e4m3fn(W_b / s_b), rounded to nearest even by the cast. Dequantisation is W'_b = Q_b * s_b
in fp32. The checkpoint stores Q as `weight` (torch.float8_e4m3fn) and s as `weight_scale_inv`
(fp32, shape (ceil(N/128), ceil(K/128))): the name says it is the inverse of the factor that maps
W into e4m3 range. An all-zero block gets s = 1 (any scale represents zeros exactly).

Error. e4m3 keeps 3 mantissa bits: a value in the normal range (|W/s| >= 2^-6) is off by at most
2^-4 of itself after rounding; below that, subnormals are spaced 2^-9, so the absolute error is at
most 2^-10 * s. `fp8_error_bound` is that bound, element-wise.

Shape legend: N output features, K input features, R = ceil(N/B), C = ceil(K/B) block grid, B block.
"""

from __future__ import annotations

import torch

from miles_core.quant.scales import divide_rounded

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK_SIZE = 128


def _check_weight(weight: torch.Tensor, what: str) -> None:
    if weight.ndim != 2:
        raise ValueError(f"{what} needs a 2-D weight (out, in), got shape {tuple(weight.shape)}")


def _grid(shape: tuple[int, int], block: int) -> tuple[int, int]:
    return -(-shape[0] // block), -(-shape[1] // block)


def _expand(scale_RC: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """Each block scale repeated over its block, cut to the weight's shape (N, K)."""
    return scale_RC.repeat_interleave(block, 0).repeat_interleave(block, 1)[: shape[0], : shape[1]]


def fp8_block_scales(weight_NK: torch.Tensor, block: int = BLOCK_SIZE) -> torch.Tensor:
    """fp32 `weight_scale_inv` (R, C): amax of each block / 448, 1 for an all-zero block."""
    _check_weight(weight_NK, "fp8_block_scales")
    N, K = weight_NK.shape
    R, C = _grid((N, K), block)
    padded = torch.zeros(R * block, C * block, dtype=torch.float32, device=weight_NK.device)
    padded[:N, :K] = weight_NK.float().abs()  # zero padding never raises a block's amax
    amax_RC = padded.view(R, block, C, block).amax(dim=(1, 3))
    return torch.where(amax_RC > 0, divide_rounded(amax_RC, FP8_MAX), torch.ones_like(amax_RC))


def quantize_fp8_block(weight_NK: torch.Tensor, block: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn weight (N, K), fp32 weight_scale_inv (R, C)) of a float weight."""
    if not weight_NK.is_floating_point():
        raise ValueError(f"quantize_fp8_block needs a floating-point weight, got {weight_NK.dtype}")
    if not bool(torch.isfinite(weight_NK).all()):
        raise ValueError("quantize_fp8_block: the weight holds NaN or Inf")
    scale_RC = fp8_block_scales(weight_NK, block)
    scaled_NK = weight_NK.float() / _expand(scale_RC, tuple(weight_NK.shape), block)
    # |scaled| <= 448 up to the division's rounding; the clamp keeps the cast finite.
    return scaled_NK.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_RC


def dequantize_fp8_block(q_NK: torch.Tensor, scale_RC: torch.Tensor, dtype: torch.dtype = torch.float32,
                         block: int = BLOCK_SIZE) -> torch.Tensor:
    """Q * s per block, in fp32, then cast to `dtype`."""
    _check_weight(q_NK, "dequantize_fp8_block")
    if q_NK.dtype != FP8_DTYPE:
        raise ValueError(f"dequantize_fp8_block needs a {FP8_DTYPE} weight, got {q_NK.dtype}")
    grid = _grid(tuple(q_NK.shape), block)
    if tuple(scale_RC.shape) != grid:
        raise ValueError(f"weight_scale_inv of a {tuple(q_NK.shape)} weight with {block}x{block} blocks must have "
                         f"shape {grid}, got {tuple(scale_RC.shape)}")
    return (q_NK.float() * _expand(scale_RC.float(), tuple(q_NK.shape), block)).to(dtype)


def fp8_error_bound(weight_NK: torch.Tensor, scale_RC: torch.Tensor, block: int = BLOCK_SIZE) -> torch.Tensor:
    """Largest |W - dequantize(quantize(W))| the format allows, element-wise (see module doc)."""
    scale_NK = _expand(scale_RC.float(), tuple(weight_NK.shape), block)
    return torch.maximum(weight_NK.float().abs() * 2.0**-4, scale_NK * 2.0**-10)
