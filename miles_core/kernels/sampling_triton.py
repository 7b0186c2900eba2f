"""Token sampling in one Triton kernel: temperature, inverse-CDF draw, greedy argmax and the
sampled token's log-prob, two passes over each row's logits.

Why: the torch sampler (`engine.sampler.sample_tokens`) materialises the (B, V) fp32 logits,
their log-softmax, its exp and its cumulative sum: at batch 256 and a 151,936-token vocabulary
that is about 1.2 GB of memory traffic and 0.7 ms of an H100 decode step of 5.9 ms (profile in
`bench/results/rollout_throughput.md`, run 3), plus a dozen launches of host time. Here each row
is read twice in bf16 (max and sum-exp online, then the running cumulative mass until the draw),
nothing (B, V) is written.

Both alignment modes use it. Fast mode (`sample`) divides by the temperature in the kernel and
computes its own log-sum-exp. Invariant mode (`sample_exact`) needs the trainer's bits: it takes
the fp32 scaled logits the trainer computes and the log-sum-exp of `triton_ops.row_logsumexp`,
the kernel the invariant log-softmax subtracts, so `z - lse` is the trainer's bit. (A kernel of
its own running the same helper code was not enough: on an H200 only 90.6% of its log-probs were
the log-softmax's bits; the order of the final sum over the lanes differs between kernels.)
One program per row: a row's token and log-prob do not depend on its batch. The draw is the
torch sampler's rule (the first token whose cumulative probability exceeds the row's uniform
number, never a zero-probability token), but cumulative sums in another order can move a draw
that falls within rounding of a bin edge, so the tokens are not bitwise the torch sampler's (no
alignment needs them to be). Top-k / top-p rows, which need the sorted logits, keep the torch
sampler.

Shape legend: B rows, V vocab.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from miles_core.kernels.triton_ops import (LOG_SOFTMAX_BLOCK, LOG_SOFTMAX_WARPS, lanes_logsumexp,
                                           online_logsumexp_step, row_logsumexp)


def sample(logits_BV: torch.Tensor, temperature_B: torch.Tensor,
           uniform_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids (B,), their log-probs (B,) under the temperature-scaled distribution; greedy
    rows, temperature 0: the argmax and its unscaled log-prob). Fast mode: the temperature
    divides in the kernel, which computes its own log-sum-exp."""
    logits = logits_BV if logits_BV.stride(-1) == 1 else logits_BV.contiguous()
    return _launch(logits, temperature_B, uniform_B, None)


def sample_exact(z_BV: torch.Tensor, temperature_B: torch.Tensor,
                 uniform_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As `sample`, for invariant mode: `z_BV` holds the fp32 temperature-scaled logits the
    trainer computes (greedy rows unscaled) and the log-sum-exp is `row_logsumexp`'s, the one the
    invariant log-softmax subtracts, so each log-prob is the trainer's bit."""
    z = z_BV.contiguous()
    return _launch(z, temperature_B, uniform_B, row_logsumexp(z))


def _launch(z_BV, temperature_B, uniform_B, lse_B):
    B, V = z_BV.shape
    tokens = torch.empty(B, device=z_BV.device, dtype=torch.int64)
    logprobs = torch.empty(B, device=z_BV.device, dtype=torch.float32)
    if B:
        _sample_kernel[(B,)](z_BV, temperature_B.float().contiguous(), uniform_B.float().contiguous(),
                             logprobs if lse_B is None else lse_B, tokens, logprobs, V, z_BV.stride(0),
                             GIVEN_LSE=lse_B is not None, BLOCK=LOG_SOFTMAX_BLOCK, num_warps=LOG_SOFTMAX_WARPS)
    return tokens, logprobs


@triton.jit
def _scaled(z_row, index, mask, scale, DIVIDE: tl.constexpr):
    """Logits at `index` in fp32, divided by the temperature (IEEE rounding) when `DIVIDE`."""
    z = tl.load(z_row + index, mask=mask, other=float("-inf")).to(tl.float32)
    return tl.div_rn(z, scale) if DIVIDE else z


@triton.jit
def _sample_kernel(z_ptr, temp_ptr, u_ptr, lse_ptr, tok_ptr, logp_ptr, V, stride, GIVEN_LSE: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = tl.load(temp_ptr + row)
    scale = tl.where(t == 0.0, 1.0, t)
    z_row = z_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK)
    DIVIDE: tl.constexpr = not GIVEN_LSE  # a given log-sum-exp comes with scaled logits
    if GIVEN_LSE:
        lse = tl.load(lse_ptr + row)
    else:  # pass 1: per-lane online max / sum-exp
        m_vec = tl.full((BLOCK,), float("-inf"), tl.float32)
        s_vec = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            m_vec, s_vec = online_logsumexp_step(m_vec, s_vec, _scaled(z_row, start + cols, start + cols < V, scale,
                                                                       DIVIDE))
        lse, _ = lanes_logsumexp(m_vec, s_vec)
    # Pass 2: the first token whose cumulative probability exceeds the uniform number (if
    # rounding leaves the total below it, the last token with non-zero probability), and the
    # argmax (first index on ties) for greedy rows.
    target = tl.load(u_ptr + row)
    running = 0.0
    found = V
    last_nonzero = 0
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, V, BLOCK):
        inside = start + cols < V
        z = _scaled(z_row, start + cols, inside, scale, DIVIDE)
        best_idx = tl.where(z > best, start + cols, best_idx)
        best = tl.maximum(best, z)
        p = tl.where(inside, tl.exp(z - lse), 0.0)
        mass = tl.cumsum(p, axis=0) + running
        hit = (mass > target) & (p > 0.0)
        found = tl.minimum(found, tl.min(tl.where(hit, start + cols, V), axis=0))
        last_nonzero = tl.maximum(last_nonzero, tl.max(tl.where(p > 0.0, start + cols, 0), axis=0))
        running += tl.sum(p, axis=0)
    token = tl.where(found < V, found, last_nonzero)
    argmax = tl.min(tl.where(best == tl.max(best, axis=0), best_idx, V), axis=0)
    token = tl.where(t == 0.0, argmax, token)
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(logp_ptr + row, _scaled(z_row, token, True, scale, DIVIDE) - lse)
