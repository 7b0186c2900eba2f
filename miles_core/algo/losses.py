"""Policy loss for GRPO-style training: PPO clip with clip-higher and dual clip, the KL and
entropy terms, and the reduction of per-token losses to one scalar.

Shape legend: B sequences in this micro-batch, T response tokens (right padded). Every
per-token tensor is (B, T) and comes with a float `loss_mask` (B, T): 1 trains on the token,
0 skips it (padding, tool output).

PPO clip (Schulman et al. 2017) with DAPO's clip-higher (separate upper bound) and dual clip
(Ye et al. 2020, bound c on the loss of negative-advantage tokens), written as slime writes it:
  ratio = exp(logp - old_logp)
  pg    = max(-A * ratio, -A * clamp(ratio, 1 - eps_clip, 1 + eps_clip_high))
  pg    = min(pg, -A * c)            where A < 0, when c = eps_clip_c > 1
Deviation: the log ratio is clamped to [-20, 20] before the exp (as verl does) so that a
diverged token gives a large finite loss rather than inf * 0 = NaN through the mask; inside
that range the math is exactly the above.

Micro-batching: `aggregate` divides by counts over the WHOLE optimizer-step batch
(`num_tokens`, `num_seqs`), never by counts of the micro-batch at hand, so the losses and
gradients of the micro-batches sum exactly to those of the full batch. Metrics use the same
reduction, so they sum across micro-batches the same way.

Extension points, each a registry entry: `POLICY_LOSSES` (a GSPO sequence-level ratio, say),
`AGGREGATIONS` (more reduction modes), `kl.KL_ESTIMATORS`. Off-policy corrections (TIS/MIS)
are per-token weights on the policy-gradient term, applied before `aggregate`.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from miles_core.algo.kl import kl_estimate
from miles_core.config import AlgoConfig
from miles_core.errors import one_of

MAX_LOG_RATIO = 20.0

PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
Aggregation = Callable[..., Tensor]


def ppo_clip_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate loss (B, T) and per-token stats `clipped`, `ratio` (no grad)."""
    if 0 < eps_clip_c <= 1:
        raise ValueError(f"eps_clip_c must be 0 (off) or > 1, got {eps_clip_c}")
    log_ratio = (log_probs - old_log_probs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1 - eps_clip, 1 + eps_clip_high)
    pg = torch.maximum(loss_unclipped, loss_clipped)
    if eps_clip_c > 1:
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * eps_clip_c), pg)
    with torch.no_grad():
        # slime's clipfrac: the clipped branch strictly won the max (dual clip not counted).
        stats = {"clipped": (loss_clipped > loss_unclipped).float(), "ratio": ratio.detach()}
    return pg, stats


def _ppo_clip_from_config(
    cfg: AlgoConfig, *, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, loss_mask: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    return ppo_clip_loss(
        log_probs, old_log_probs, advantages,
        eps_clip=cfg.eps_clip, eps_clip_high=cfg.eps_clip_high, eps_clip_c=cfg.eps_clip_c,
    )


# Entries take (cfg, *, log_probs, old_log_probs, advantages, loss_mask) and return the
# per-token loss (B, T) plus per-token stats that include `clipped`.
POLICY_LOSSES: dict[str, PolicyLossFn] = {"ppo_clip": _ppo_clip_from_config}
# AlgoConfig has no field choosing the policy loss yet; until a second entry lands, this one.
POLICY_LOSS = "ppo_clip"


def _token_mean(x: Tensor, loss_mask: Tensor, *, num_tokens: float, num_seqs: float) -> Tensor:
    return (x * loss_mask).sum() / num_tokens


def _seq_mean_token_mean(x: Tensor, loss_mask: Tensor, *, num_tokens: float, num_seqs: float) -> Tensor:
    seq_len = loss_mask.sum(dim=-1).clamp(min=1)  # (B,); an all-masked row contributes 0
    return ((x * loss_mask).sum(dim=-1) / seq_len).sum() / num_seqs


# Entries take (per_token (B, T), loss_mask (B, T), *, num_tokens, num_seqs) -> scalar, where
# the counts are global over the optimizer-step batch (see the module docstring).
AGGREGATIONS: dict[str, Aggregation] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
}


def aggregate(per_token: Tensor, loss_mask: Tensor, mode: str, *, num_tokens: float, num_seqs: float) -> Tensor:
    """Reduce a (B, T) per-token tensor to a scalar with global denominators.

    `num_tokens` is sum(loss_mask) and `num_seqs` the number of sequences (rows, all-masked ones
    included), both over the whole optimizer-step batch, not this micro-batch.
    """
    if mode not in AGGREGATIONS:
        # Checked against AlgoConfig at recipe load; reaching here is a caller bug.
        raise ValueError(str(one_of("loss aggregation mode", mode, AGGREGATIONS)))
    if num_tokens <= 0 or num_seqs <= 0:
        raise ValueError(
            f"num_tokens and num_seqs must be > 0 (global counts of the step's batch), got {num_tokens} and {num_seqs}"
        )
    return AGGREGATIONS[mode](per_token, loss_mask, num_tokens=num_tokens, num_seqs=num_seqs)


def policy_loss(
    cfg: AlgoConfig,
    *,
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    num_tokens: float,
    num_seqs: float,
    entropy: Tensor | None = None,
    ref_log_probs: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """pg_loss + kl_loss_coef * kl_loss - entropy_coef * entropy_loss, and slime-named metrics.

    `advantages` are per token (B, T) (see `advantages.broadcast_to_tokens`). `ref_log_probs`
    is required when `cfg.use_kl_loss`, `entropy` when `cfg.entropy_coef > 0`; an `entropy`
    given with a zero coefficient is only logged.
    """
    _check_inputs(cfg, loss_mask, log_probs=log_probs, old_log_probs=old_log_probs,
                  advantages=advantages, entropy=entropy, ref_log_probs=ref_log_probs)
    reduce = functools.partial(aggregate, loss_mask=loss_mask, mode=cfg.loss_agg_mode,
                               num_tokens=num_tokens, num_seqs=num_seqs)
    pg_per_token, stats = POLICY_LOSSES[POLICY_LOSS](
        cfg, log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, loss_mask=loss_mask
    )
    pg_loss = reduce(pg_per_token)
    loss = pg_loss
    kl_loss = None
    if cfg.use_kl_loss:
        kl_loss = reduce(kl_estimate(log_probs, ref_log_probs, cfg.kl_loss_type))
        loss = loss + cfg.kl_loss_coef * kl_loss
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * reduce(entropy)
    with torch.no_grad():
        metrics = {
            "pg_loss": pg_loss.item(),
            "pg_clipfrac": reduce(stats["clipped"]).item(),
            "ppo_kl": reduce(old_log_probs - log_probs).item(),
        }
        if kl_loss is not None:
            metrics["kl_loss"] = kl_loss.item()
        if entropy is not None:
            metrics["entropy_loss"] = reduce(entropy).item()
        metrics["loss"] = loss.item()
    return loss, metrics


def _check_inputs(cfg: AlgoConfig, loss_mask: Tensor, **per_token: Tensor | None) -> None:
    if cfg.use_kl_loss and per_token["ref_log_probs"] is None:
        raise ValueError("use_kl_loss is set but ref_log_probs was not given")
    if cfg.entropy_coef > 0 and per_token["entropy"] is None:
        raise ValueError(f"entropy_coef is {cfg.entropy_coef} but entropy was not given")
    for name, tensor in per_token.items():
        if tensor is not None and tensor.shape != loss_mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but loss_mask has {tuple(loss_mask.shape)}; "
                "every per-token input must be (B, T)"
            )
