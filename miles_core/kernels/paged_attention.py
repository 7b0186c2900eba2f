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
Invariant mode on a narrower query tile: with G query heads per KV head, 64 - G of the 64 rows
are masked work (G = 2 for Qwen3-0.6B: an H200 timed the kernel at 107 us for 256 sequences
against 91 us on 16 rows). 16 rows per warp is how the 64-row tile lays out over its 4 warps, so
a tile of 16 rows on one warp (`narrow_tile`, G <= 16) computes each row as one warp of the
reference tile does; on the H200 that held (bitwise over 64 and 256 sequences), and not for 16
rows on two or four warps (which split a row across warps) nor for 32 rows on two warps. It is
checked on the device once per shape against the 64-row tile (`narrow_tile_agrees`) and used
only where it holds.
Keys past a row's position (a block's unwritten tail) are masked to -inf before the softmax
and get weight exactly 0; the pool keeps only finite numbers there (blocks are zeroed on first
use), so they add exact zeros, as the dense kernel's masked keys do. Fast mode uses a 16-row
query tile on 4 warps (the smallest tl.dot accepts, or G rounded up to a power of two).

Shape legend: B sequences, H query heads, K kv heads, G = H / K, D key dim, V value dim,
N pool blocks, P block size, M blocks per row.
"""

from __future__ import annotations

import logging
import math

import torch

from miles_core.kernels import triton_ops

BLOCK_N = 64
"""Key tile of `triton_ops._attention_kernel`; the pool's block size must equal it."""
INVARIANT_TILE = (64, 4)
"""(query rows, warps) of invariant mode's reference tile: the dense kernel's."""
_narrow_agrees: dict[tuple, bool] = {}
log = logging.getLogger("miles")

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
    G = q_BHD.shape[1] // keys_NPKD.shape[2]
    if not invariant:
        tile = (_rows_for(G), 4)
    else:
        narrow = narrow_tile(G)
        agrees = narrow != INVARIANT_TILE and narrow_tile_agrees(q_BHD, keys_NPKD, values_NPKV)
        tile = narrow if agrees else INVARIANT_TILE
    return _launch(q_BHD, keys_NPKD, values_NPKV, block_tables_BM, positions_B, tile)


def narrow_tile(G: int) -> tuple[int, int]:
    """(rows, warps): 16 rows on one warp, as one warp of the reference tile holds them, where G
    query heads fit; else the reference tile (32 rows on two warps gave other bits on an H200)."""
    return (16, 1) if G <= 16 else INVARIANT_TILE


def _rows_for(G: int) -> int:
    """G query heads rounded up to a power of two, at least the 16 rows tl.dot takes."""
    return max(16, 1 << (G - 1).bit_length())


def narrow_tile_agrees(q_BHD: torch.Tensor, keys_NPKD: torch.Tensor, values_NPKV: torch.Tensor) -> bool:
    """Whether `narrow_tile` gives the reference tile's bits for this shape and dtype on this
    device: 64 random sequences of up to 640 keys through both, compared bitwise, once per shape.
    Inside a CUDA graph capture an unchecked shape takes the reference tile."""
    H, D = q_BHD.shape[1:]
    K, DV = keys_NPKD.shape[2], values_NPKV.shape[3]
    key = (q_BHD.device, q_BHD.dtype, keys_NPKD.dtype, H, K, D, DV)
    agree = _narrow_agrees.get(key)
    if agree is None:
        if q_BHD.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        B, blocks = 64, 10
        gen = torch.Generator(device=q_BHD.device).manual_seed(0)
        rand = lambda *shape, dtype: torch.randn(*shape, generator=gen, device=q_BHD.device, dtype=dtype)
        keys = rand(B * blocks, BLOCK_N, K, D, dtype=keys_NPKD.dtype)
        values = rand(B * blocks, BLOCK_N, K, DV, dtype=values_NPKV.dtype)
        q = rand(B, H, D, dtype=q_BHD.dtype)
        tables = torch.randperm(B * blocks, generator=gen, device=q.device).view(B, blocks).to(torch.int32)
        positions = torch.randint(0, blocks * BLOCK_N, (B,), generator=gen, device=q.device, dtype=torch.int32)
        args = (q, keys, values, tables, positions)
        agree = torch.equal(_launch(*args, narrow_tile(H // K)), _launch(*args, INVARIANT_TILE))
        _narrow_agrees[key] = agree
        if not agree:
            log.warning("paged attention: the %s-row query tile differs in bits from the %s-row tile for %s heads "
                        "over %s KV heads on %s; invariant mode takes the wider tile", narrow_tile(H // K)[0],
                        INVARIANT_TILE[0], H, K, q.device)
    return agree


def _launch(q_BHD, keys_NPKD, values_NPKV, block_tables_BM, positions_B, tile: tuple[int, int]) -> torch.Tensor:
    B, H, D = q_BHD.shape
    K, DV = keys_NPKD.shape[2], values_NPKV.shape[3]
    q = q_BHD.contiguous()
    keys, values = keys_NPKD.view(-1, K, D), values_NPKV.view(-1, K, DV)  # (N * P, K, D): slot-major
    out = torch.empty(B, H, DV, device=q.device, dtype=q.dtype)
    rows, warps = tile
    _paged_decode_kernel[(B * K,)](
        q, keys, values, block_tables_BM, positions_B, out, K, H // K, D, DV, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        block_tables_BM.stride(0), out.stride(0), out.stride(1), IEEE=q.dtype == torch.float32,
        BLOCK_M=rows, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_DV=max(16, triton.next_power_of_2(DV)), num_warps=warps, num_stages=2)
    return out
