"""Causal GQA attention: the vendor path (SDPA) and a batch-invariant path.

Positions are explicit: a query at position p attends to keys at positions 0..p. Without a KV
cache each row is one sequence starting at position 0; with a cache, keys sit at their position.

Batch invariance: a query row must give the same bits in prefill (the whole sequence at once),
in decode (one new token against the cache), at any batch size and padding. The invariant path
walks the keys in fixed blocks of `KEY_BLOCK` positions from position 0 with an online softmax
(running max m, normaliser l, accumulator acc; Milakov & Gimelshein 2018):
    m' = max(m, rowmax(s_b));  l = l e^(m - m') + rowsum(e^(s_b - m'));  acc = acc e^(m - m') + e^(s_b - m') V_b
Scores are dot products taken elementwise and summed over the head dim, so every row's numbers
depend only on its own query and keys. Blocks past a query's position are fully masked and
change nothing exactly (e^-inf = 0, e^0 = 1), so a query sees the same arithmetic whether 3 or
300 keys are loaded. On CUDA a Triton kernel with the same block walk is used when available.

Shape legend: B batch, H query heads, K kv heads, G = H / K, T queries, S keys, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KEY_BLOCK = 16


def attention_reference(q_BHTD, k_BKSD, v_BKSD, position_ids_BT, cached: bool) -> torch.Tensor:
    if not cached:
        return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, is_causal=True, enable_gqa=True)
    key_pos_S = torch.arange(k_BKSD.shape[2], device=k_BKSD.device)
    mask_BTS = key_pos_S[None, None, :] <= position_ids_BT[:, :, None]
    return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask_BTS[:, None], enable_gqa=True)


def attention_invariant(q_BHTD, k_BKSD, v_BKSD, position_ids_BT, cached: bool) -> torch.Tensor:
    return blockwise_attention(q_BHTD, k_BKSD, v_BKSD, position_ids_BT)


def blockwise_attention(q_BHTD, k_BKSD, v_BKSD, position_ids_BT) -> torch.Tensor:
    B, H, T, D = q_BHTD.shape
    K, S = k_BKSD.shape[1], k_BKSD.shape[2]
    q = q_BHTD.view(B, K, H // K, T, 1, D).float()
    pad = (-S) % KEY_BLOCK
    k = F.pad(k_BKSD, (0, 0, 0, pad)).float()[:, :, None, None]  # (B, K, 1, 1, S', D)
    v = F.pad(v_BKSD, (0, 0, 0, pad)).float()[:, :, None, None]
    query_pos = position_ids_BT[:, None, None, :, None]  # (B, 1, 1, T, 1)
    scale = 1.0 / math.sqrt(D)
    m = torch.full((B, K, H // K, T, 1), float("-inf"), device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(B, K, H // K, T, v.shape[-1], device=q.device)
    for start in range(0, S + pad, KEY_BLOCK):
        block = slice(start, start + KEY_BLOCK)
        scores = (q * k[..., block, :]).sum(-1) * scale  # (B, K, G, T, KEY_BLOCK)
        key_pos = torch.arange(start, start + KEY_BLOCK, device=q.device)
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
        alpha, p = torch.exp(m - m_new), torch.exp(scores - m_new)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + (p[..., None] * v[..., block, :]).sum(-2)
        m = m_new
    return (acc / l).view(B, H, T, -1).to(q_BHTD.dtype)
