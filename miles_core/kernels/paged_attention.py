"""Paged decode attention in Triton: one query per sequence, keys read in place from the KV pool.

The engine's pool holds, per layer, keys (N blocks, P = 64 tokens, K heads, D) and values
(N, P, K, V); a sequence's key at position s lives in block `block_tables[b, s // P]`, row
`s % P`. The dense path gathers those keys into a fresh (B, K, S, D) tensor per layer and step;
this kernel walks the block table instead, one block per key tile. One program serves the G
query heads that share a KV head (GQA), as rows of the query tile, so each key and value is read
once per KV head, not once per query head.

Invariance: the kernel body is `triton_ops._attention_kernel`'s (flash-attention forward,
online softmax over BLOCK_N = 64 keys from position 0, one query head per program, the same
tl.dot shapes, warps and stages); only the key/value addresses differ. With P == BLOCK_N each
tile is one block, so the tiles, their order and every product are the dense kernel's, and in
invariant mode (BLOCK_M = 64, the dense kernel's query tile) the output is bitwise identical:
a row of `tl.dot` and of the softmax depends only on that row, so the other heads in the
dense kernel's masked rows change nothing.
Keys past a row's position (a block's unwritten tail) are masked to -inf before the softmax
and get weight exactly 0; the pool keeps only finite numbers there (blocks are zeroed on first
use), so they add exact zeros, as the dense kernel's masked keys do. Fast mode uses a 16-row
query tile (the smallest tl.dot accepts, or G rounded up to a power of two).

Shape legend: B sequences, H query heads, K kv heads, G = H / K, D key dim, V value dim,
N pool blocks, P block size, M blocks per row.
"""

from __future__ import annotations

import math

import torch

from miles_core.kernels import triton_ops

BLOCK_N = 64
"""Key tile of `triton_ops._attention_kernel`; the pool's block size must equal it."""

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine gathers keys and uses the dense ops instead
    triton = None


def usable(device: torch.device, block_size: int) -> bool:
    """The paged kernel can run: CUDA (or Triton's interpreter), Triton installed, P == BLOCK_N."""
    if triton is None or block_size != BLOCK_N:
        return False
    return device.type == "cuda" and triton_ops.available()


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, o_ptr, K, G, D, DV, scale,
                             sq_b, sq_h, sk_n, sk_h, sv_n, sv_h, st_b, so_b, so_h,
                             IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        bk = tl.program_id(0)
        b, kv = bk // K, bk % K
        rows = tl.arange(0, BLOCK_M)  # row r < G is query head kv * G + r; the rest are masked
        heads = kv * G + rows
        d, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :],
                    mask=(rows[:, None] < G) & (d[None, :] < D), other=0.0)
        qpos = tl.load(pos_ptr + b + rows * 0, mask=rows < G, other=-1)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        last = tl.load(pos_ptr + b) + 1  # the query's keys: 0..position
        offs = tl.arange(0, BLOCK_N)
        for start in range(0, last, BLOCK_N):
            block = tl.load(table_ptr + b * st_b + start // BLOCK_N).to(tl.int64)
            slot = block * BLOCK_N + offs  # one pool block per key tile
            keys = start + offs
            k = tl.load(k_ptr + slot[None, :] * sk_n + kv * sk_h + d[:, None], mask=d[:, None] < D, other=0.0)
            k = k.to(q.dtype)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee") * scale
            else:
                s = tl.dot(q, k) * scale
            s = tl.where(keys[None, :] <= qpos[:, None], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - safe)
            p = tl.exp(s - safe[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + slot[:, None] * sv_n + kv * sv_h + dv[None, :], mask=dv[None, :] < DV, other=0.0)
            v = v.to(q.dtype)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
        tl.store(o_ptr + b * so_b + heads[:, None] * so_h + dv[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(rows[:, None] < G) & (dv[None, :] < DV))


def paged_decode(q_BHD: torch.Tensor, keys_NPKD: torch.Tensor, values_NPKV: torch.Tensor,
                 block_tables_BM: torch.Tensor, positions_B: torch.Tensor, *, invariant: bool) -> torch.Tensor:
    """Attention of one query per row (at `positions_B`) over keys 0..position of that row,
    read through its block table. Returns (B, H, V) in q's dtype. No host synchronisation and
    fixed launch shapes, so it can be captured in a CUDA graph."""
    B, H, D = q_BHD.shape
    K, DV = keys_NPKD.shape[2], values_NPKV.shape[3]
    q = q_BHD.contiguous()
    keys, values = keys_NPKD.view(-1, K, D), values_NPKV.view(-1, K, DV)  # (N * P, K, D): slot-major
    out = torch.empty(B, H, DV, device=q.device, dtype=q.dtype)
    G = H // K
    _paged_decode_kernel[(B * K,)](
        q, keys, values, block_tables_BM, positions_B, out, K, G, D, DV, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        block_tables_BM.stride(0), out.stride(0), out.stride(1), IEEE=q.dtype == torch.float32,
        BLOCK_M=64 if invariant else max(16, triton.next_power_of_2(G)), BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_DV=max(16, triton.next_power_of_2(DV)), num_warps=4, num_stages=2)
    return out
