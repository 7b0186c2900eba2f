"""The batch-invariant linear in Triton: C = A W^T (+ b), the engine's and the trainer's alike.

Tiles of BLOCK_M x BLOCK_N, K walked in BLOCK_K steps from 0, no split-K: an output element's
reduction order depends on K and BLOCK_K alone, so a token's numbers do not depend on how many
other tokens share the call. fp32 inputs use IEEE products (no tf32) so fp32 results stay
fp32-accurate. Decode-sized calls may run narrower tiles, and the engine may run q/k/v (gate/up)
as one fused weight, each only where the device gives the bits of the default tiles on the
separate weights (checked once per shape: `small_tiles_agree`, `fusion_agrees`).

The backward is not invariant and need not be: it is plain PyTorch matmuls.

Shape legend: M rows, N out features, K in features.
"""

from __future__ import annotations

import functools
import logging

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch invariant paths are used instead
    triton = None

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). One configuration for every problem size: the
# row results must not depend on M. `bench/linear_configs.py` compares candidates on H100.
LINEAR_CONFIG = {"ieee": (64, 64, 32, 4, 2), "half": (128, 128, 64, 8, 3)}
# Calls of at most SMALL_M rows (a decode step) on the 128 x 128 tiles give a GEMM with N = 1,024
# only 2 x 8 programs for 132 SMs: in an H100 profile of an invariant decode step at batch 256 the
# linears took 2.6x cuBLAS's time. Narrower tiles with the same BLOCK_K walk K in the same order,
# and a tensor-core instruction computes an output element the same way whatever the tile's width,
# so they should give the same bits. That is checked on the device once per weight shape
# (`small_tiles_agree`), and only where it holds are they used: a row's bits never depend on M.
# They are used only where the default grid leaves SMs idle: on H100 at M = 256 they were slower
# than the default tiles over the 0.6B decode shapes, dominated by the lm_head (N = 151,936), whose
# default grid already has over a thousand programs. Of the narrower tiles, the 64-wide ones are
# taken where they still give every SM a program (an H200, timed inside CUDA graphs at M = 256:
# 7.4 / 9.8 us against 8.9 / 13.1 us on the 32-wide tiles for N = 4,096 / 6,144, K = 1,024), the
# 32-wide ones elsewhere (N = 1,024: 64 programs on 64-wide tiles, 7.5 vs 8.8 us).
SMALL_M = 256
SMALL_M_CONFIG = (64, 32, 64, 4, 4)
SMALL_M_WIDE_CONFIG = (64, 64, 64, 4, 4)
FUSION_PROBE_ROWS = (1, 16, 64, 128, SMALL_M, SMALL_M + 1)
"""Rows of the calls `fusion_agrees` compares: every tile regime of a decode step, and the default."""
_agreement: dict[tuple, bool] = {}
_fusion_agreement: dict[tuple, bool] = {}
log = logging.getLogger("miles")


if triton is not None:

    @triton.jit
    def _linear_kernel(a_ptr, w_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_wn, stride_cm,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)  # grouped order: neighbouring programs share W tiles in L2
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :],
                        mask=(rows[:, None] < M) & (k0 + ks[None, :] < K), other=0.0)
            w = tl.load(w_ptr + cols[None, :] * stride_wn + (k0 + ks)[:, None],
                        mask=(cols[None, :] < N) & (k0 + ks[:, None] < K), other=0.0)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))


def _linear_forward(x_MK: torch.Tensor, w_NK: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x_MK, w_NK = x_MK.contiguous(), w_NK.to(x_MK.dtype).contiguous()
    ieee = x_MK.dtype == torch.float32
    if ieee:
        config = LINEAR_CONFIG["ieee"]
    elif x_MK.shape[0] <= SMALL_M and not _default_tiles_fill_card(x_MK.shape[0], w_NK):
        small = _small_tiles(x_MK.shape[0], w_NK)
        config = small if small_tiles_agree(w_NK, small) else LINEAR_CONFIG["half"]
    else:
        config = LINEAR_CONFIG["half"]
    return _launch_linear(x_MK, w_NK, bias, config)


def _launch_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, bias: torch.Tensor | None, config: tuple) -> torch.Tensor:
    M, K = x_MK.shape
    N = w_NK.shape[0]
    out = torch.empty(M, N, device=x_MK.device, dtype=x_MK.dtype)
    block_m, block_n, block_k, warps, stages = config
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _linear_kernel[grid](x_MK, w_NK, bias if bias is not None else x_MK, out, M, N, K,
                         x_MK.stride(0), w_NK.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                         IEEE=x_MK.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                         GROUP_M=8, num_warps=warps, num_stages=stages)
    return out


def _default_tiles_fill_card(M: int, w_NK: torch.Tensor) -> bool:
    """Whether the default tiles give every SM of the weight's device a program (always false
    off CUDA, where only the tests' stand-in launcher runs)."""
    return _fills_card(M, w_NK, LINEAR_CONFIG["half"])


def _small_tiles(M: int, w_NK: torch.Tensor) -> tuple:
    """The wider of the decode-sized tiles where they still fill the card, else the narrow ones."""
    return SMALL_M_WIDE_CONFIG if _fills_card(M, w_NK, SMALL_M_WIDE_CONFIG) else SMALL_M_CONFIG


def _fills_card(M: int, w_NK: torch.Tensor, config: tuple) -> bool:
    block_m, block_n = config[:2]
    return -(-M // block_m) * -(-w_NK.shape[0] // block_n) >= _sm_count(w_NK.device)


@functools.cache  # asked on every decode-sized call
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1 << 30
    return torch.cuda.get_device_properties(device).multi_processor_count


def small_tiles_agree(w_NK: torch.Tensor, small: tuple = SMALL_M_CONFIG) -> bool:
    """Whether the decode-sized tiles `small` give the default tiles' bits for this weight's shape
    and dtype on its device: SMALL_M random rows through both, compared bitwise, once per shape.
    Inside a CUDA graph capture an unchecked shape takes the default tiles (a check cannot run there)."""
    key = (w_NK.device, w_NK.dtype, *w_NK.shape, small, LINEAR_CONFIG["half"])
    agree = _agreement.get(key)
    if agree is None:
        if _capturing(w_NK.device):
            return False
        gen = torch.Generator(device=w_NK.device).manual_seed(0)
        probe = torch.randn(SMALL_M, w_NK.shape[1], generator=gen, device=w_NK.device, dtype=w_NK.dtype)
        agree = torch.equal(_launch_linear(probe, w_NK, None, small),
                            _launch_linear(probe, w_NK, None, LINEAR_CONFIG["half"]))
        _agreement[key] = agree
        if not agree:
            log.warning("invariant linear: the small-batch tiles %s differ in bits from %s for weight %s %s on %s; "
                        "every call takes the default tiles", small, LINEAR_CONFIG["half"], tuple(w_NK.shape),
                        w_NK.dtype, w_NK.device)
    return agree


def fusion_agrees(fused_NK: torch.Tensor, sizes: tuple[int, ...]) -> bool:
    """Whether the linear of a weight stacked from row blocks of `sizes` rows (q/k/v, gate/up) gives,
    block by block, the bits of each block's own linear, in every tile regime (`FUSION_PROBE_ROWS`):
    random weights and rows of this shape through both, compared bitwise, once per shape. Where it
    holds, the engine runs one GEMM where the trainer runs two or three and they still agree bit
    for bit (an output element's reduction does not depend on its column). Inside a CUDA graph
    capture an unchecked shape runs the separate weights."""
    key = (fused_NK.device, fused_NK.dtype, fused_NK.shape[1], tuple(sizes))
    agree = _fusion_agreement.get(key)
    if agree is None:
        if _capturing(fused_NK.device):
            return False
        gen = torch.Generator(device=fused_NK.device).manual_seed(0)
        rand = lambda *shape: torch.randn(*shape, generator=gen, device=fused_NK.device, dtype=fused_NK.dtype)
        weight = rand(*fused_NK.shape) / fused_NK.shape[1] ** 0.5
        probe = rand(max(FUSION_PROBE_ROWS), fused_NK.shape[1])
        blocks = weight.split(list(sizes))
        agree = all(torch.equal(_linear_forward(probe[:rows], weight, None),
                                torch.cat([_linear_forward(probe[:rows], block, None) for block in blocks], dim=1))
                    for rows in FUSION_PROBE_ROWS)
        _fusion_agreement[key] = agree
        if not agree:
            log.warning("invariant linear: a fused weight of blocks %s x %s differs in bits from its blocks on %s; "
                        "the engine runs them separately", sizes, fused_NK.shape[1], fused_NK.device)
    return agree


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return _linear_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        grad_x = grad @ weight.to(grad.dtype)
        grad_w = (grad.T @ x).to(weight.dtype)
        grad_b = grad.sum(0).to(bias.dtype) if bias is not None else None
        return grad_x, grad_w, grad_b


def linear(x_MK: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _Linear.apply(x_MK, weight, bias)
