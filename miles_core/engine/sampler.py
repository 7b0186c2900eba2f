"""Next-token sampling: temperature, top-k, top-p, and the logprob of the token drawn.

The logprob returned is that of the distribution actually sampled from (after temperature,
top-k and top-p, renormalised); greedy rows (temperature 0) report the unscaled distribution.
Each row draws with one uniform number from its own seeded stream (inverse-CDF sampling), so a
sequence's samples do not depend on which other sequences share its batch.

Shape legend: B rows, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miles_core.kernels.norms import log_softmax_reference

try:
    from miles_core.kernels import sampling_triton
except ImportError:  # no Triton: the torch sampler serves every device
    sampling_triton = None


@dataclass(frozen=True)
class SamplerFlags:
    """What a step's rows need, when the caller knows it from their settings; each flag that is
    false skips a pass over the (B, V) logits with bitwise the same result (256 x 151,936 fp32
    logits are 155 MB a pass)."""

    filtered: bool = True
    """A sampled row has top-k or top-p (the logits must be sorted)."""
    greedy: bool = True
    """A row has temperature 0 (an argmax)."""
    scaled: bool = True
    """A row's temperature is neither 0 nor 1 (a division; dividing by 1 changes no bit)."""


def flags_of(temperature_B: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> SamplerFlags:
    """The flags read from the tensors (a device-to-host wait)."""
    greedy = temperature_B == 0
    return SamplerFlags(filtered=bool((((top_k_B > 0) | (top_p_B < 1)) & ~greedy).any()), greedy=bool(greedy.any()),
                        scaled=bool(((temperature_B != 0) & (temperature_B != 1)).any()))


def process_logits(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor,
                   top_p_B: torch.Tensor, *, filtered: bool | None = None, scaled: bool = True) -> torch.Tensor:
    """Temperature-scaled, top-k/top-p filtered logits (filtered entries are -inf), in fp32.
    `filtered`: whether any sampled row has top-k or top-p, when the caller knows (else it is
    read from the tensors, a device-to-host wait); `scaled = False`: every temperature is 0 or 1."""
    greedy = temperature_B == 0
    scale = torch.where(greedy, torch.ones_like(temperature_B), temperature_B)
    logits = logits_BV.float() / scale[:, None] if scaled else logits_BV.float()
    use_k = (top_k_B > 0) & ~greedy
    use_p = (top_p_B < 1) & ~greedy
    if not (filtered if filtered is not None else bool(use_k.any() or use_p.any())):
        return logits
    sorted_vals, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(use_k, top_k_B, torch.full_like(top_k_B, vocab))
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_vals.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= use_p[:, None] & (mass_before >= top_p_B[:, None])  # keeps the top token always
    return logits.scatter(-1, sorted_idx, sorted_vals.masked_fill(drop, float("-inf")))


def sample_tokens(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_k_B: torch.Tensor,
                  top_p_B: torch.Tensor, uniform_B: torch.Tensor, log_softmax=log_softmax_reference,
                  flags: SamplerFlags | None = None, fused: bool = False,
                  exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. Returns (token ids (B,), their logprobs (B,)). `log_softmax` is
    the trainer's kernel in invariant mode, so both sides compute the same bits. `flags`: what
    the rows need, if the caller knows (else read from the tensors). `fused`: CUDA rows without
    top-k / top-p take one Triton kernel (`kernels.sampling_triton`; the same rule, its draws not
    always this path's); `exact` (invariant mode): its log-probs are then the invariant
    log-softmax's bits."""
    flags = flags or flags_of(temperature_B, top_k_B, top_p_B)
    if fused and not flags.filtered and logits_BV.is_cuda and sampling_triton is not None:
        if exact:
            z = process_logits(logits_BV, temperature_B, top_k_B, top_p_B, filtered=False, scaled=flags.scaled)
            return sampling_triton.sample_exact(z, temperature_B, uniform_B)
        return sampling_triton.sample(logits_BV, temperature_B, uniform_B)
    logits = process_logits(logits_BV, temperature_B, top_k_B, top_p_B, filtered=flags.filtered, scaled=flags.scaled)
    logprobs_BV = log_softmax(logits)
    cdf_BV = logprobs_BV.exp().cumsum(dim=-1)
    target_B = uniform_B.to(cdf_BV) * cdf_BV[:, -1]
    # right=True: the first index whose cumulative mass exceeds the target, so tokens with
    # zero probability (zero-width bins) are never chosen.
    sampled = torch.searchsorted(cdf_BV, target_B[:, None], right=True).squeeze(1)
    sampled = sampled.clamp_(max=logits_BV.shape[-1] - 1)
    tokens = torch.where(temperature_B == 0, logprobs_BV.argmax(dim=-1), sampled) if flags.greedy else sampled
    return tokens, logprobs_BV.gather(-1, tokens[:, None]).squeeze(1)
