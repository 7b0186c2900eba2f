"""Token sampling in one Triton kernel: temperature, inverse-CDF draw, greedy argmax and the
sampled token's log-prob, two passes over each row's logits.

Why: the torch sampler (`engine.sampler.sample_tokens`) materialises the (B, V) fp32 logits,
their log-softmax, its exp and its cumulative sum: at batch 256 and a 151,936-token vocabulary
that is about 1.2 GB of memory traffic and 0.7 ms of an H100 decode step of 5.9 ms (profile in
`bench/results/rollout_throughput.md`, run 3), plus a dozen launches of host time. Here each row
is read twice in bf16 (max and sum-exp online, then the running cumulative mass until the draw),
nothing (B, V) is written.

Both alignment modes use it. The log-prob is exact for invariant mode: the temperature divides
with IEEE rounding (`div_rn`, as the trainer's tensor division does; Triton's `/` is approximate)
and the log-sum-exp is the invariant log-softmax kernel's own (the same `triton_ops` helpers over
the same chunk width and warps, `LOG_SOFTMAX_BLOCK` / `LOG_SOFTMAX_WARPS`), so `z - lse` is the
bit the trainer computes. One program per row: a row's token and log-prob do not depend on its
batch. The draw is the torch sampler's rule (the first token whose cumulative probability exceeds
the row's uniform number, never a zero-probability token), but cumulative sums in another order
can move a draw that falls within rounding of a bin edge, so the tokens are not bitwise the torch
sampler's (no alignment needs them to be). Top-k / top-p rows, which need the sorted logits, keep
the torch sampler.

Shape legend: B rows, V vocab.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from miles_core.kernels.triton_ops import (LOG_SOFTMAX_BLOCK, LOG_SOFTMAX_WARPS, lanes_logsumexp,
                                           online_logsumexp_step)


def sample(logits_BV: torch.Tensor, temperature_B: torch.Tensor,
           uniform_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids (B,), their log-probs (B,) under the temperature-scaled distribution; greedy
    rows, temperature 0: the argmax and its unscaled log-prob)."""
    logits = logits_BV if logits_BV.stride(-1) == 1 else logits_BV.contiguous()
    B, V = logits.shape
    tokens = torch.empty(B, device=logits.device, dtype=torch.int64)
    logprobs = torch.empty(B, device=logits.device, dtype=torch.float32)
    if B:
        _sample_kernel[(B,)](logits, temperature_B.float().contiguous(), uniform_B.float().contiguous(), tokens,
                             logprobs, V, logits.stride(0), BLOCK=LOG_SOFTMAX_BLOCK,
                             num_warps=LOG_SOFTMAX_WARPS)
    return tokens, logprobs


@triton.jit
def _sample_kernel(z_ptr, temp_ptr, u_ptr, tok_ptr, logp_ptr, V, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(temp_ptr + row)
    scale = tl.where(t == 0.0, 1.0, t)
    z_row = z_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK)
    # Pass 1: per-lane online max / sum-exp, and per-lane argmax (first index on ties).
    m_vec = tl.full((BLOCK,), float("-inf"), tl.float32)
    s_vec = tl.zeros((BLOCK,), tl.float32)
    best_idx = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, V, BLOCK):
        z = tl.div_rn(tl.load(z_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32), scale)
        best_idx = tl.where(z > m_vec, start + cols, best_idx)
        m_vec, s_vec = online_logsumexp_step(m_vec, s_vec, z)
    lse, m = lanes_logsumexp(m_vec, s_vec)
    argmax = tl.min(tl.where(m_vec == m, best_idx, V), axis=0)
    # Pass 2: the first token whose cumulative probability exceeds the uniform number; if
    # rounding leaves the total below it, the last token with non-zero probability.
    target = tl.load(u_ptr + row)
    running = 0.0
    found = V
    last_nonzero = 0
    for start in range(0, V, BLOCK):
        inside = start + cols < V
        z = tl.div_rn(tl.load(z_row + start + cols, mask=inside, other=float("-inf")).to(tl.float32), scale)
        p = tl.where(inside, tl.exp(z - lse), 0.0)
        mass = tl.cumsum(p, axis=0) + running
        hit = (mass > target) & (p > 0.0)
        found = tl.minimum(found, tl.min(tl.where(hit, start + cols, V), axis=0))
        last_nonzero = tl.maximum(last_nonzero, tl.max(tl.where(p > 0.0, start + cols, 0), axis=0))
        running += tl.sum(p, axis=0)
    token = tl.where(found < V, found, last_nonzero)
    token = tl.where(t == 0.0, argmax, token)
    z_token = tl.div_rn(tl.load(z_row + token).to(tl.float32), scale)
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(logp_ptr + row, z_token - lse)
