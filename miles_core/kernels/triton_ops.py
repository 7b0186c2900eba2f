"""Batch-invariant CUDA kernels in Triton: RMSNorm, log-softmax and causal attention (padded rows
and packed ones); the linear is `triton_linear`'s.

Why these are invariant: every kernel runs one fixed configuration (block sizes, warps, stages)
whatever the problem size, never splits a reduction across programs (no split-K), and computes
each output row from that row's inputs alone with a fixed loop order. So a token's numbers do
not depend on how many other tokens share the launch, which is what makes the engine's decode
and the trainer's forward agree bit for bit. The price against vendor kernels is the loss of
size-specific tuning (cuBLAS and flash attention pick kernels per shape); `bench/align_overhead.py`
measures it.

- `rms_norm`: one program per row, the whole row in one block (hidden sizes up to 16384), warps
  by row width (`rms_norm_warps`).
- `log_softmax`: one program per row for the log-sum-exp (online max / sum-exp over fixed vocab
  chunks, `row_logsumexp`), then z - lse (an exactly rounded fp32 subtraction).
- `attention`: flash-attention forward (online softmax over BLOCK_N keys from position 0) with
  explicit query positions; keys sit at their index; a query at position p sees keys 0..p.
  Decode (one query) uses the same kernel and tile shape as prefill.
- `packed_attention`: the same kernel over a packed row's segments in one launch (the trainer's
  packed forward): each segment's tiles and loop are those of a separate call on that segment.

Backward passes are not invariant and need not be: they recompute with the plain PyTorch
reference (`matmul`, `norms`, `attention` modules) and differentiate that.

Shape legend: B batch, H heads, T queries, S keys, D head dim, R rows, V vocab.
"""

from __future__ import annotations

import functools
import math

import torch

from miles_core.kernels.attention import attention_reference
from miles_core.kernels.norms import rms_norm_reference
from miles_core.kernels.packed import (
    PackedSegments,
    VarlenLayout,
    segment_attention,
    varlen_applies,
    varlen_packed_attention,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch invariant paths are used instead
    triton = None




@functools.cache
def available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, E, stride, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride + cols, mask=cols < E, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / E + eps)
        normed = (x * inv).to(y_ptr.dtype.element_ty)  # HF: cast back before the weight multiply
        w = tl.load(w_ptr + cols, mask=cols < E, other=0.0)
        y = (w.to(tl.float32) * normed.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * stride + cols, y, mask=cols < E)

    @triton.jit
    def online_logsumexp_step(m_vec, s_vec, z):
        """One chunk of a per-lane online log-sum-exp: the lanes' new max and their sum of
        exp(z - max) rescaled to it (lanes that saw only -inf keep max -inf and sum 0)."""
        m_new = tl.maximum(m_vec, z)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        return m_new, s_vec * tl.exp(m_vec - safe) + tl.exp(z - safe)

    @triton.jit
    def lanes_logsumexp(m_vec, s_vec):
        """The row's log-sum-exp from the lanes' (max, sum) and the row's max."""
        m = tl.max(m_vec, axis=0)
        return m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), axis=0)), m

    @triton.jit
    def _row_logsumexp_kernel(z_ptr, lse_ptr, V, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m_vec = tl.full((BLOCK,), float("-inf"), tl.float32)
        s_vec = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):  # per-lane online max / sum, fixed chunk order
            z = tl.load(z_ptr + row * stride + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_vec, s_vec = online_logsumexp_step(m_vec, s_vec, z)
        lse, _ = lanes_logsumexp(m_vec, s_vec)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, cu_q_ptr, cu_k_ptr, T, S, H, G, D, DV, scale,
                          sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_t, sp_b,
                          VARLEN: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        kv = h // G
        if VARLEN:  # row b is segment b of one packed row: its queries and keys start at offsets
            q_off, k_off = tl.load(cu_q_ptr + b), tl.load(cu_k_ptr + b)
            n_q, n_k = tl.load(cu_q_ptr + b + 1) - q_off, tl.load(cu_k_ptr + b + 1) - k_off
            b = 0
        else:
            q_off, k_off, n_q, n_k = 0, 0, T, S
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + (q_off + rows[:, None]) * sq_t + d[None, :],
                    mask=(rows[:, None] < n_q) & (d[None, :] < D), other=0.0)
        qpos = tl.load(pos_ptr + b * sp_b + q_off + rows, mask=rows < n_q, other=-1)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        last = tl.minimum(tl.max(qpos, axis=0) + 1, n_k)  # trailing fully-masked blocks change nothing
        k_row = k_ptr + b * sk_b + kv * sk_h + k_off * sk_s
        v_row = v_ptr + b * sv_b + kv * sv_h + k_off * sv_s
        for start in range(0, last, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            k = tl.load(k_row + keys[None, :] * sk_s + d[:, None], mask=(keys[None, :] < n_k) & (d[:, None] < D),
                        other=0.0)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee") * scale
            else:
                s = tl.dot(q, k) * scale
            s = tl.where((keys[None, :] <= qpos[:, None]) & (keys[None, :] < n_k), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - safe)
            p = tl.exp(s - safe[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(v_row + keys[:, None] * sv_s + dv[None, :], mask=(keys[:, None] < n_k) & (dv[None, :] < DV),
                        other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
        tl.store(o_ptr + b * so_b + h * so_h + (q_off + rows[:, None]) * so_t + dv[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=(rows[:, None] < n_q) & (dv[None, :] < DV))


def with_reference_backward(forward_fn, reference_fn):
    """An autograd op whose forward is a Triton kernel and whose backward differentiates the
    PyTorch reference (gradients need no invariance)."""

    class _Op(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            ctx.save_for_backward(*[a for a in args if isinstance(a, torch.Tensor)])
            ctx.args = args
            return forward_fn(*args)

        @staticmethod
        def backward(ctx, grad):
            args = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in ctx.args]
            with torch.enable_grad():
                out = reference_fn(*args)
            inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            grads = iter(torch.autograd.grad(out, inputs, grad) if inputs else [])
            return tuple(next(grads) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args)

    return _Op.apply


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Output in x's dtype (the weight is cast to it: engine and trainer hold the same dtype)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    E = x2.shape[1]
    y = torch.empty_like(x2)
    block = triton.next_power_of_2(E)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight.to(x.dtype).contiguous(), y, E, x2.stride(0), eps,
                                     BLOCK=block, num_warps=rms_norm_warps(block))
    return y.view(x.shape)


def rms_norm_warps(block: int) -> int:
    """Warps per row: 512 elements a warp, 1 to 8. A function of the row width alone, so it fixes the
    sum's order for every batch. (An H200 inside CUDA graphs: Qwen3's per-head q/k norms, width 128
    over 262,144 rows, 160 us on one warp against 246 us on eight; width 1,024 over 16,384 rows,
    17.7 us on two against 23.5 us on eight.)"""
    return min(8, max(1, block // 512))


rms_norm = with_reference_backward(_rms_norm_forward, rms_norm_reference)


LOG_SOFTMAX_BLOCK, LOG_SOFTMAX_WARPS = 4096, 8
"""Chunk width and warps of the row log-sum-exp (they fix its lanes' reduction order); the
fused sampler's own first pass (fast mode) reduces over the same."""


def row_logsumexp(z_RV: torch.Tensor) -> torch.Tensor:
    """(R,) fp32 log-sum-exp of each row of a contiguous (R, V) tensor, in a fixed order: the
    invariant log-softmax and the engine's exact sampler (`sampling_triton.sample_exact`) both
    take theirs from this one kernel, so their log-probs agree bit for bit."""
    lse = torch.empty(z_RV.shape[0], device=z_RV.device, dtype=torch.float32)
    _row_logsumexp_kernel[(z_RV.shape[0],)](z_RV, lse, z_RV.shape[1], z_RV.stride(0), BLOCK=LOG_SOFTMAX_BLOCK,
                                            num_warps=LOG_SOFTMAX_WARPS)
    return lse


def log_softmax(z: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax over the last dim, z - log-sum-exp in fp32 (forward only: used under
    no-grad / inside autograd Functions that provide their own backward)."""
    z2 = z.reshape(-1, z.shape[-1]).contiguous()
    return (z2.float() - row_logsumexp(z2)[:, None]).to(z.dtype).view(z.shape)


ATTENTION_BLOCK = 64
"""Queries and keys per attention tile: one size for every call (prefill, decode, packed rows)."""


def _attention_forward(q_BHTD, k_BKSD, v_BKSD, position_ids_BT) -> torch.Tensor:
    B, H, T, _ = q_BHTD.shape
    q = q_BHTD.contiguous()
    k, v = k_BKSD.to(q.dtype).contiguous(), v_BKSD.to(q.dtype).contiguous()
    pos = position_ids_BT.to(torch.int32).contiguous()
    out = torch.empty(B, H, T, v.shape[3], device=q.device, dtype=q.dtype)
    return _launch_attention(q, k, v, pos, out, (triton.cdiv(T, ATTENTION_BLOCK), B * H), None)


def _packed_attention_forward(q_1HTD, k_1KTD, v_1KTD, position_ids_1T, packed: PackedSegments) -> torch.Tensor:
    """One launch for a packed row: program (i, s * H + h) runs query tile i of segment s over the
    segment's keys (its prefix gathered in front of its own tokens), the same tiles and loop a
    separate call per segment runs, so each token gets the padded forward's and the engine's bits."""
    layout = packed.varlen if packed.varlen is not None else VarlenLayout.of(packed.segments, q_1HTD.device)
    q = q_1HTD.contiguous()
    k, v = k_1KTD.to(q.dtype), v_1KTD.to(q.dtype)
    if layout.key_index is not None:
        k, v = k[:, :, layout.key_index], v[:, :, layout.key_index]
    k, v = k.contiguous(), v.contiguous()
    pos = position_ids_1T.to(torch.int32).contiguous()
    out = torch.empty(*q.shape[:3], v.shape[3], device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(layout.max_q, ATTENTION_BLOCK), (layout.cu_q.numel() - 1) * q.shape[1])
    return _launch_attention(q, k, v, pos, out, grid, layout)


def _launch_attention(q, k, v, pos, out, grid, layout: VarlenLayout | None) -> torch.Tensor:
    H, D, DV = q.shape[1], q.shape[3], v.shape[3]
    cu_q, cu_k = (layout.cu_q, layout.cu_k) if layout is not None else (pos, pos)  # unread without VARLEN
    _attention_kernel[grid](q, k, v, pos, out, cu_q, cu_k, q.shape[2], k.shape[2], H, H // k.shape[1], D, DV,
                            1.0 / math.sqrt(D), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                            k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
                            out.stride(2), pos.stride(0), VARLEN=layout is not None, IEEE=q.dtype == torch.float32,
                            BLOCK_M=ATTENTION_BLOCK, BLOCK_N=ATTENTION_BLOCK, BLOCK_D=max(16, triton.next_power_of_2(D)),
                            BLOCK_DV=max(16, triton.next_power_of_2(DV)), num_warps=4, num_stages=2)
    return out


def _attention_reference(q_BHTD, k_BKSD, v_BKSD, position_ids_BT):
    return attention_reference(q_BHTD, k_BKSD.to(q_BHTD.dtype), v_BKSD.to(q_BHTD.dtype), position_ids_BT, True)


def _packed_attention_reference(q_1HTD, k_1KTD, v_1KTD, position_ids_1T, packed: PackedSegments) -> torch.Tensor:
    """What the backward differentiates: flash attention's varlen call where it applies, else the
    segment loop (gradients need no invariance)."""
    k, v = k_1KTD.to(q_1HTD.dtype), v_1KTD.to(q_1HTD.dtype)
    if varlen_applies(q_1HTD, v):
        return varlen_packed_attention(q_1HTD, k, v, packed)
    return segment_attention(attention_reference, q_1HTD, k, v, position_ids_1T, packed)


attention = with_reference_backward(_attention_forward, _attention_reference)
packed_attention = with_reference_backward(_packed_attention_forward, _packed_attention_reference)
