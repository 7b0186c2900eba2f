"""Train/inference mismatch correction: importance weights between the trainer's and the rollout
engine's probabilities of the sampled tokens (TIS, MIS, rejection sampling, veto, IcePop).

Shape legend: B sequences, T response tokens (right padded); every tensor is (B, T) with a
float `loss_mask`. rho_t = exp(old_logp_t - rollout_logp_t): `old_log_probs` are the trainer's
log-probs under the weights that generated the batch (detached), `rollout_log_probs` the engine's.

Levels (`algo.tis_level`, `algo.rs_level`), the log-weight of token t of a row:
  token       log rho_t
  sequence    sum_s m_s log rho_s               (product of the ratios)
  geometric   sum_s m_s log rho_s / sum_s m_s   (their geometric mean)
Sequence and geometric weights are shared by every token of the row. Log-weights are clamped to
[-20, 20] before exp, as slime does.
Modes (`algo.tis_mode`) with bounds lo = `tis_clip_low`, hi = `tis_clip_high`:
  truncate    w = min(w, hi)                  TIS (Yao et al. 2025, "Your efficient RL framework
                                              secretly brings you off-policy RL training")
  clip        w = clamp(w, lo, hi)
  mask        w kept; tokens with w outside [lo, hi] rejected   (MIS)
IcePop (Ling team 2025, Ring-1T) is token level, mask mode: recipes set those two keys.
Rejection sampling (`algo.use_rs`): tokens whose `rs_level` weight is outside
[rs_clip_low, rs_clip_high] are rejected, independent of the TIS weights (slime's decoupled RS).
Veto (`algo.tis_veto_threshold` > 0): a row with any trained token of rho_t below the threshold
is rejected whole (catastrophic tokens, e.g. 1e-4).
Batch normalisation (`algo.tis_batch_normalize`): w / mean(w), the mean of the bounded weights
(before rejection, as slime) over the optimizer-step batch: over tokens at token level, over
sequences otherwise. A micro-batch cannot see that mean, so the trainer computes it once with
`tis_batch_mean` and passes it in.

The multiplier applied to the per-token policy-gradient loss is w / mean * keep (detached).
Rejected tokens keep their place in the loss denominators (slime's decoupling): rejection
removes a token's gradient, not its count. `policy_loss` applies `keep` to every term it
reduces (pg, KL loss, entropy) and to the training metrics (pg_clipfrac, ppo_kl,
train_rollout_logprob_abs_diff), as slime's reducer rebuilt with the rejection mask does; the
TIS/MIS statistics themselves are reduced over all trained tokens (slime's pre-rejection
reducer), so a rejected fraction is not driven to 0. In the sequence-level batch mean an
all-masked row counts as weight 0 (slime). All reductions are per row, so micro-batches of
whole sequences give exactly the full batch's result.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from miles_core.algo.hooks import hook_error, resolve_hook
from miles_core.config import AlgoConfig

SAFETY_BOUND = 20.0
MIN_BATCH_MEAN = 1e-8


def level_log_ratio(log_ratio: Tensor, loss_mask: Tensor, level: str) -> Tensor:
    """(B, T) token log-ratios -> (B, T) log-weights at `level` (token, sequence, geometric)."""
    if level == "token":
        return log_ratio
    mask = (loss_mask > 0).to(log_ratio.dtype)
    total = (log_ratio * mask).sum(dim=-1, keepdim=True)  # (B, 1)
    if level == "sequence":
        return total.expand_as(log_ratio)
    if level == "geometric":
        return (total / mask.sum(dim=-1, keepdim=True).clamp(min=1)).expand_as(log_ratio)
    raise ValueError(f"level must be token, sequence or geometric, got '{level}'")


def bound_weights(weights: Tensor, mode: str, low: float, high: float) -> tuple[Tensor, Tensor]:
    """(bounded weights, keep) for `mode` truncate, clip or mask; keep is a bool (B, T)."""
    if mode == "truncate":
        return weights.clamp(max=high), torch.ones_like(weights, dtype=torch.bool)
    if mode == "clip":
        return weights.clamp(low, high), torch.ones_like(weights, dtype=torch.bool)
    if mode == "mask":
        return weights, (weights >= low) & (weights <= high)
    raise ValueError(f"mode must be truncate, clip or mask, got '{mode}'")


def veto_keep(log_ratio: Tensor, loss_mask: Tensor, threshold: float) -> Tensor:
    """(B, 1) bool: False for rows with a trained token of ratio < `threshold` (0 disables)."""
    if threshold <= 0:
        return torch.ones(log_ratio.shape[0], 1, dtype=torch.bool, device=log_ratio.device)
    catastrophic = (log_ratio < math.log(threshold)) & (loss_mask > 0)
    return ~catastrophic.any(dim=-1, keepdim=True)


def _weights_at(log_ratio: Tensor, loss_mask: Tensor, level: str) -> Tensor:
    return torch.exp(level_log_ratio(log_ratio, loss_mask, level).clamp(-SAFETY_BOUND, SAFETY_BOUND))


def is_weights(cfg: AlgoConfig, *, old_log_probs: Tensor, rollout_log_probs: Tensor,
               loss_mask: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Built-in TIS/MIS/RS/veto: (bounded weights, keep 0/1, per-token stats), each (B, T).

    A custom TIS hook (`algo.custom_tis_function`) has this signature and returns the same.
    """
    log_ratio = (old_log_probs - rollout_log_probs).detach()
    weights = torch.ones_like(log_ratio)
    keep = torch.ones_like(log_ratio, dtype=torch.bool)
    stats: dict[str, Tensor] = {}
    if cfg.use_tis:
        raw = _weights_at(log_ratio, loss_mask, cfg.tis_level)
        weights, keep = bound_weights(raw, cfg.tis_mode, cfg.tis_clip_low, cfg.tis_clip_high)
        stats["tis"] = raw
        stats["tis_clipfrac"] = (weights != raw).float()
    if cfg.use_rs:
        rs_raw = _weights_at(log_ratio, loss_mask, cfg.rs_level)
        keep = keep & bound_weights(rs_raw, "mask", cfg.rs_clip_low, cfg.rs_clip_high)[1]
    if cfg.tis_veto_threshold > 0:
        vetoed = ~veto_keep(log_ratio, loss_mask, cfg.tis_veto_threshold)  # (B, 1)
        stats["tis_veto_frac"] = vetoed.expand_as(log_ratio).float()
        keep = keep & ~vetoed
    stats["tis_masked_frac"] = (~keep).float()
    return weights, keep.to(weights.dtype), stats


def _weight_fn(cfg: AlgoConfig):
    return resolve_hook(cfg.custom_tis_function, "tis") if cfg.custom_tis_function else is_weights


def _call_weight_fn(cfg: AlgoConfig, **tensors: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    out = _weight_fn(cfg)(cfg, **tensors)
    if cfg.custom_tis_function:
        shape = tensors["loss_mask"].shape
        ok = (isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], dict)
              and all(isinstance(t, Tensor) and t.shape == shape for t in (out[0], out[1], *out[2].values())))
        if not ok:
            raise hook_error("tis", cfg.custom_tis_function,
                             f"must return (weights, keep, stats): two {tuple(shape)} tensors and a dict of them")
    return out


def mean_weight(weights: Tensor, loss_mask: Tensor, level: str) -> float:
    """Mean of (B, T) weights over trained tokens (token level) or over sequences (otherwise)."""
    mask = (loss_mask > 0).to(weights.dtype)
    if level == "token":
        return float((weights * mask).sum() / mask.sum().clamp(min=1))
    # An all-masked row counts as weight 0, as slime's per-sample mean does (and as the loss
    # denominators count it): leaving it out would make the mean of the other rows' weights.
    row_means = (weights * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return float(row_means.mean()) if row_means.numel() else 1.0


def tis_batch_mean(cfg: AlgoConfig, *, old_log_probs: Tensor, rollout_log_probs: Tensor, loss_mask: Tensor) -> float:
    """The mean weight of the whole optimizer-step batch, for `tis_batch_normalize` (1.0 if ~0)."""
    weights, _, _ = _call_weight_fn(cfg, old_log_probs=old_log_probs.detach(),
                                    rollout_log_probs=rollout_log_probs, loss_mask=loss_mask)
    mean = mean_weight(weights, loss_mask, cfg.tis_level)
    return mean if mean > MIN_BATCH_MEAN else 1.0


def correction_weights(cfg: AlgoConfig, *, old_log_probs: Tensor, rollout_log_probs: Tensor, loss_mask: Tensor,
                       batch_mean: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The detached (B, T) multiplier of the per-token pg loss, and per-token stats for metrics.

    The stat `keep` (0/1) is the rejection mask itself; `policy_loss` applies it to every loss
    term and to the training metrics, not only to the pg loss (see the module docstring)."""
    weights, keep, stats = _call_weight_fn(cfg, old_log_probs=old_log_probs.detach(),
                                           rollout_log_probs=rollout_log_probs, loss_mask=loss_mask)
    if cfg.tis_batch_normalize:
        if batch_mean is None:
            raise ValueError("tis_batch_normalize is set but tis_batch_mean was not given "
                             "(compute it once per optimizer step with correction.tis_batch_mean)")
        weights = weights / batch_mean
    multiplier = (weights * keep).detach()
    return multiplier, {**stats, "tis_weight": multiplier, "keep": keep.detach()}


def ratio_extrema(old_log_probs: Tensor, rollout_log_probs: Tensor, loss_mask: Tensor) -> dict[str, Tensor]:
    """Min and max token ratio rho over trained tokens (`tis_ratio_min`/`_max`) as 0-dim tensors,
    computed without a device sync; +inf / -inf when no token is trained (dropped from metrics)."""
    rho = torch.exp((old_log_probs - rollout_log_probs).detach().clamp(-SAFETY_BOUND, SAFETY_BOUND))
    trained = loss_mask > 0
    return {"tis_ratio_min": torch.where(trained, rho, math.inf).amin(),
            "tis_ratio_max": torch.where(trained, rho, -math.inf).amax()}
