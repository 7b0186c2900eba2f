"""Group-wise symmetric INT4 weight quantisation (W4A16) and compressed-tensors' int32 packing.

Math (compressed-tensors' own, so its decompression reads our checkpoints bit for bit). A weight
W (N out, K in) is cut along K into groups of g consecutive inputs. Each group gets one scale
s = amax(|W_group|) / 7.5 (7.5 = half the int4 range 15, so amax lands on +-7.5 and rounds into
[-8, 7]), computed in W's dtype; an all-zero group gets the dtype's epsilon. The integers are
q = round(clamp(W / s, -8, 7)) (round half to even) and W' = q * s in the scale's dtype.

Packing ("pack-quantized"). Each q is offset by 8 into 0..15 and 8 consecutive values along K are
packed into one int32, value i of a word in bits 4i..4i+3 (little nibble first): a row of K
integers becomes K/8 words. The checkpoint stores `weight_packed` (int32, (N, K/8)),
`weight_scale` (W's dtype, (N, K/g)) and `weight_shape` (int64, [N, K]).

Shape legend: N output features, K input features, G = K/g groups, g group size, P = K/8 words.
"""

from __future__ import annotations

import torch

from miles_core.quant.scales import divide_rounded

NUM_BITS = 4
Q_MIN, Q_MAX = -8, 7
HALF_RANGE = 7.5
PER_WORD = 32 // NUM_BITS
GROUP_SIZES = (32, 64, 128)


def check_group_size(shape: tuple[int, ...], group_size: int, name: str = "weight") -> None:
    """A clear error when `group_size` does not split the input features of a 2-D weight."""
    if len(shape) != 2:
        raise ValueError(f"{name}: INT4 quantises 2-D weights (out, in), got shape {tuple(shape)}")
    if group_size < 1 or shape[1] % group_size:
        raise ValueError(f"{name}: group size {group_size} does not divide its {shape[1]} input features "
                         f"(shape {tuple(shape)})")


def int4_group_scales(weight_NK: torch.Tensor, group_size: int) -> torch.Tensor:
    """Scales (N, G) in the weight's dtype: amax of each group / 7.5 (eps for a zero group)."""
    check_group_size(tuple(weight_NK.shape), group_size)
    N, K = weight_NK.shape
    amax_NG = weight_NK.view(N, K // group_size, group_size).abs().amax(-1)
    scale_NG = divide_rounded(amax_NG, HALF_RANGE)
    return torch.where(scale_NG == 0, torch.finfo(scale_NG.dtype).eps, scale_NG)


def quantize_int4(weight_NK: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 integers in [-8, 7] (N, K), scales (N, G)) of a float weight."""
    if not weight_NK.is_floating_point():
        raise ValueError(f"quantize_int4 needs a floating-point weight, got {weight_NK.dtype}")
    if not bool(torch.isfinite(weight_NK).all()):
        raise ValueError("quantize_int4: the weight holds NaN or Inf")
    scale_NG = int4_group_scales(weight_NK, group_size)
    N, K = weight_NK.shape
    scaled_NGg = weight_NK.view(N, K // group_size, group_size) / scale_NG[..., None]
    q_NK = torch.round(scaled_NGg.clamp(Q_MIN, Q_MAX)).view(N, K)
    return q_NK.to(torch.int8), scale_NG


def dequantize_int4(q_NK: torch.Tensor, scale_NG: torch.Tensor) -> torch.Tensor:
    """q * s per group, in the scale's dtype."""
    if q_NK.dtype != torch.int8 or q_NK.ndim != 2:
        raise ValueError(f"dequantize_int4 needs 2-D int8 integers, got {q_NK.dtype} {tuple(q_NK.shape)}")
    N, K = q_NK.shape
    if scale_NG.ndim != 2 or scale_NG.shape[0] != N or scale_NG.shape[1] < 1 or K % scale_NG.shape[1]:
        raise ValueError(f"weight_scale of a {(N, K)} weight must be (N, K / group size), got {tuple(scale_NG.shape)}")
    G = scale_NG.shape[1]
    return (q_NK.view(N, G, K // G).to(scale_NG.dtype) * scale_NG[..., None]).view(N, K)


def fake_quantize_int4(weight_NK: torch.Tensor, group_size: int) -> torch.Tensor:
    """dequantize(quantize(W)): the values an INT4 engine computes with, in W's dtype."""
    return dequantize_int4(*quantize_int4(weight_NK, group_size)).to(weight_NK.dtype)


def pack_int4(q_NK: torch.Tensor) -> torch.Tensor:
    """int8 integers in [-8, 7] (N, K) -> int32 words (N, K/8), compressed-tensors' layout."""
    if q_NK.dtype != torch.int8 or q_NK.ndim != 2:
        raise ValueError(f"pack_int4 needs 2-D int8 integers, got {q_NK.dtype} {tuple(q_NK.shape)}")
    N, K = q_NK.shape
    if K % PER_WORD:
        raise ValueError(f"pack_int4 needs input features divisible by {PER_WORD}, got {K}")
    if q_NK.numel() and (int(q_NK.min()) < Q_MIN or int(q_NK.max()) > Q_MAX):
        raise ValueError(f"pack_int4: integers must lie in [{Q_MIN}, {Q_MAX}], got [{int(q_NK.min())}, {int(q_NK.max())}]")
    nibbles_NP8 = (q_NK.to(torch.int64) - Q_MIN).view(N, K // PER_WORD, PER_WORD)
    shifts = torch.arange(PER_WORD, device=q_NK.device, dtype=torch.int64) * NUM_BITS
    words_NP = (nibbles_NP8 << shifts).sum(-1)  # in [0, 2^32): exact in int64
    # Reinterpret as two's-complement int32 (a word with the top nibble >= 8 is negative).
    return torch.where(words_NP >= 2**31, words_NP - 2**32, words_NP).to(torch.int32)


def unpack_int4(packed_NP: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """int32 words (N, K/8) -> int8 integers in [-8, 7] with the weight's `shape` (N, K)."""
    if packed_NP.dtype != torch.int32 or packed_NP.ndim != 2:
        raise ValueError(f"unpack_int4 needs 2-D int32 words, got {packed_NP.dtype} {tuple(packed_NP.shape)}")
    N, K = (int(v) for v in shape)
    if K % PER_WORD or tuple(packed_NP.shape) != (N, K // PER_WORD):
        raise ValueError(f"weight_packed of a {(N, K)} weight must be {(N, K // PER_WORD)}, got {tuple(packed_NP.shape)}")
    words_NP = packed_NP.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(PER_WORD, device=packed_NP.device, dtype=torch.int64) * NUM_BITS
    nibbles_NP8 = (words_NP[..., None] >> shifts) & 0xF
    return (nibbles_NP8 + Q_MIN).view(N, K).to(torch.int8)
