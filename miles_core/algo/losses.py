"""Policy losses for GRPO-style training (PPO clip, GSPO, CISPO), OPSM, the value loss, the KL
and entropy terms, and the reduction of per-token losses to one scalar.

Shape legend: B sequences in this micro-batch, T response tokens (right padded). Every
per-token tensor is (B, T) and comes with a float `loss_mask` (B, T): 1 trains on the token,
0 skips it (padding, tool output). rho = exp(logp - old_logp) per token.

Policy losses (`algo.policy_loss`), A = advantage per token:
  ppo_clip  pg = max(-A rho, -A clamp(rho, 1 - eps_clip, 1 + eps_clip_high)), and where A < 0
            with eps_clip_c = c > 1, pg = min(pg, -A c)  (Schulman et al. 2017; DAPO's
            clip-higher, Yu et al. 2025; dual clip, Ye et al. 2020), written as slime writes it.
  gspo      the same with rho replaced by the row's sequence ratio
            s = exp(sum_t m_t (logp_t - old_logp_t) / sum_t m_t) on every token of the row
            (Zheng et al. 2025, GSPO); d s / d logp_t = s / |row| for each trained token.
  cispo     pg = -sg(clamp(rho, 1 - eps_clip, 1 + eps_clip_high)) * A * logp: the clipped ratio
            is a constant weight and every token keeps its gradient (MiniMax-M1, 2025);
            eps_clip = 1 turns the lower bound off, as in the paper.
OPSM (`algo.use_opsm`, DeepSeek-V3.2): a row whose mean (old_logp - logp) over trained tokens
exceeds `opsm_delta` has its negative-advantage tokens masked out of the pg loss.
Value loss (PPO critic, slime's form): max((V_clip - R)^2, (V - R)^2) with
V_clip = V_old + clamp(V - V_old, -value_clip, value_clip); value_clip = 0 is plain (V - R)^2.
Deviation: log ratios are clamped to [-20, 20] before exp (as verl) so that a diverged token
gives a large finite loss rather than inf * 0 = NaN through the mask.

Order in `policy_loss`: pg per token -> * TIS/MIS weights (`correction.py`) -> * OPSM mask ->
reduce; + kl_loss_coef * KL (times rho with `use_unbiased_kl`), - entropy_coef * entropy,
+ value_loss_coef * value loss. A token rejected by MIS, rejection sampling or the veto drops out
of the pg, KL and entropy terms and of pg_clipfrac, ppo_kl and train_rollout_logprob_abs_diff,
but stays in the denominators (slime's reducer rebuilt with the rejection mask).

Reductions (`algo.loss_agg_mode`) divide by counts over the WHOLE optimizer-step batch
(`num_tokens` = sum of the loss mask, `num_seqs` rows) or by a constant, never by counts of the
micro-batch at hand, so losses and gradients of micro-batches of whole sequences sum exactly to
the full batch's:
  token_mean               sum_bt m x / num_tokens
  seq_mean_token_mean      sum_b (sum_t m x / sum_t m) / num_seqs
  seq_mean_token_sum_norm  sum_b (sum_t m x / loss_scale_factor) / num_seqs   (Dr. GRPO's constant)
Loss terms use the chosen reduction; diagnostic metrics (clip fractions, ppo_kl, TIS stats) use
it too, except under seq_mean_token_sum_norm, where they use seq_mean_token_mean so fractions
stay fractions. Metrics are additive over micro-batches except `*_min` / `*_max`, which
`accumulate_metrics` combines with min / max.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

from miles_core.algo.correction import correction_weights, ratio_extrema
from miles_core.algo.hooks import hook_error, resolve_hook
from miles_core.algo.kl import kl_estimate
from miles_core.config import AlgoConfig
from miles_core.errors import one_of

MAX_LOG_RATIO = 20.0

PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]
Aggregation = Callable[..., Tensor]


def clipped_surrogate(log_ratio: Tensor, advantages: Tensor, *, eps_clip: float, eps_clip_high: float,
                      eps_clip_c: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clip loss (B, T) of a log ratio, and per-token stats `clipped`, `ratio` (no grad)."""
    if 0 < eps_clip_c <= 1:
        raise ValueError(f"eps_clip_c must be 0 (off) or > 1, got {eps_clip_c}")
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1 - eps_clip, 1 + eps_clip_high)
    pg = torch.maximum(loss_unclipped, loss_clipped)
    if eps_clip_c > 1:
        pg = torch.where(advantages < 0, torch.minimum(pg, -advantages * eps_clip_c), pg)
    with torch.no_grad():
        # slime's clipfrac: the clipped branch strictly won the max (dual clip not counted).
        stats = {"clipped": (loss_clipped > loss_unclipped).float(), "ratio": ratio.detach()}
    return pg, stats


def ppo_clip_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, *, eps_clip: float,
                  eps_clip_high: float, eps_clip_c: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate loss (B, T) and per-token stats `clipped`, `ratio` (no grad)."""
    return clipped_surrogate(log_probs - old_log_probs, advantages, eps_clip=eps_clip,
                             eps_clip_high=eps_clip_high, eps_clip_c=eps_clip_c)


def sequence_log_ratio(log_probs: Tensor, old_log_probs: Tensor, loss_mask: Tensor) -> Tensor:
    """(B, T): each row's mean log ratio over its trained tokens, on every position of the row."""
    mask = (loss_mask > 0).to(log_probs.dtype)
    mean = ((log_probs - old_log_probs) * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    return mean.expand_as(log_probs)


def gspo_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, loss_mask: Tensor, *,
              eps_clip: float, eps_clip_high: float, eps_clip_c: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: PPO clip on the sequence ratio exp(mean log ratio) shared by the row's tokens."""
    return clipped_surrogate(sequence_log_ratio(log_probs, old_log_probs, loss_mask), advantages,
                             eps_clip=eps_clip, eps_clip_high=eps_clip_high, eps_clip_c=eps_clip_c)


def cispo_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, *, eps_clip: float,
               eps_clip_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: -sg(clamp(rho, 1 - eps_clip, 1 + eps_clip_high)) * A * logp per token."""
    with torch.no_grad():
        ratio = torch.exp((log_probs - old_log_probs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
        truncated = ratio.clamp(1 - eps_clip, 1 + eps_clip_high)
        stats = {"clipped": (truncated != ratio).float(), "ratio": ratio}
    return -truncated * advantages * log_probs, stats


def opsm_keep(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, loss_mask: Tensor,
              delta: float) -> Tensor:
    """(B, T) 0/1: 0 on negative-advantage tokens of rows whose mean (old_logp - logp) > delta."""
    with torch.no_grad():
        seq_kl = -sequence_log_ratio(log_probs, old_log_probs, loss_mask)
        return (~((advantages < 0) & (seq_kl > delta))).to(log_probs.dtype)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, *,
               value_clip: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped value loss (B, T) and the per-token stat `clipped` (no grad)."""
    unclipped = (values - returns).square()
    if value_clip <= 0:
        return unclipped, {"clipped": torch.zeros_like(values).detach()}
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    loss = torch.maximum((clipped_values - returns).square(), unclipped)
    return loss, {"clipped": ((values - old_values).abs() > value_clip).float().detach()}


def _ppo_clip(cfg: AlgoConfig, *, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, loss_mask: Tensor):
    return ppo_clip_loss(log_probs, old_log_probs, advantages,
                         eps_clip=cfg.eps_clip, eps_clip_high=cfg.eps_clip_high, eps_clip_c=cfg.eps_clip_c)


def _gspo(cfg: AlgoConfig, *, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, loss_mask: Tensor):
    return gspo_loss(log_probs, old_log_probs, advantages, loss_mask,
                     eps_clip=cfg.eps_clip, eps_clip_high=cfg.eps_clip_high, eps_clip_c=cfg.eps_clip_c)


def _cispo(cfg: AlgoConfig, *, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, loss_mask: Tensor):
    return cispo_loss(log_probs, old_log_probs, advantages, eps_clip=cfg.eps_clip, eps_clip_high=cfg.eps_clip_high)


# Entries (and a custom loss hook) take (cfg, *, log_probs, old_log_probs, advantages, loss_mask)
# and return the per-token loss (B, T) plus per-token stats; `clipped` is reported as pg_clipfrac.
POLICY_LOSSES: dict[str, PolicyLossFn] = {"ppo_clip": _ppo_clip, "gspo": _gspo, "cispo": _cispo}


def _token_mean(x: Tensor, loss_mask: Tensor, *, num_tokens: float, num_seqs: float, norm_len: float) -> Tensor:
    return (x * loss_mask).sum() / num_tokens


def _seq_mean_token_mean(x: Tensor, loss_mask: Tensor, *, num_tokens: float, num_seqs: float,
                         norm_len: float) -> Tensor:
    seq_len = loss_mask.sum(dim=-1).clamp(min=1)  # (B,); an all-masked row contributes 0
    return ((x * loss_mask).sum(dim=-1) / seq_len).sum() / num_seqs


def _seq_mean_token_sum_norm(x: Tensor, loss_mask: Tensor, *, num_tokens: float, num_seqs: float,
                             norm_len: float) -> Tensor:
    if norm_len <= 0:
        raise ValueError(f"seq_mean_token_sum_norm needs a constant normaliser norm_len > 0, got {norm_len}")
    return ((x * loss_mask).sum(dim=-1) / norm_len).sum() / num_seqs


# Entries take (per_token (B, T), loss_mask (B, T), *, num_tokens, num_seqs, norm_len) -> scalar,
# where the counts are global over the optimizer-step batch (see the module docstring).
AGGREGATIONS: dict[str, Aggregation] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,
}


def aggregate(per_token: Tensor, loss_mask: Tensor, mode: str, *, num_tokens: float, num_seqs: float,
              norm_len: float = 0.0) -> Tensor:
    """Reduce a (B, T) per-token tensor to a scalar with global denominators.

    `num_tokens` is sum(loss_mask) and `num_seqs` the number of sequences (rows, all-masked ones
    included), both over the whole optimizer-step batch, not this micro-batch; `norm_len` is the
    constant of `seq_mean_token_sum_norm`.
    """
    if mode not in AGGREGATIONS:
        # Checked against AlgoConfig at recipe load; reaching here is a caller bug.
        raise ValueError(str(one_of("loss aggregation mode", mode, AGGREGATIONS)))
    if num_tokens <= 0 or num_seqs <= 0:
        raise ValueError(
            f"num_tokens and num_seqs must be > 0 (global counts of the step's batch), got {num_tokens} and {num_seqs}"
        )
    return AGGREGATIONS[mode](per_token, loss_mask, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)


def policy_loss(cfg: AlgoConfig, **tensors) -> tuple[Tensor, dict[str, float]]:
    """The whole loss of one micro-batch and slime-named metrics (see the module docstring).
    `policy_loss_tensors` with the metrics read to floats."""
    loss, metrics = policy_loss_tensors(cfg, **tensors)
    return loss, metric_floats(metrics)


def metric_floats(metrics: dict[str, Tensor]) -> dict[str, float]:
    """0-dim metric tensors to floats in one device-to-host copy; the TIS ratio extrema of a
    micro-batch without trained tokens (+-inf) are left out."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().double().reshape(()) for v in metrics.values()]).tolist()
    return {k: v for k, v in zip(metrics, values) if not (k.startswith("tis_ratio_m") and math.isinf(v))}


def policy_loss_tensors(
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
    rollout_log_probs: Tensor | None = None,
    tis_batch_mean: float | None = None,
    values: Tensor | None = None,
    old_values: Tensor | None = None,
    returns: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`policy_loss` with the metrics as 0-dim tensors: no device sync, so a trainer can start the
    backward pass before reading them (`metric_floats`).

    Required by config: `ref_log_probs` with `use_kl_loss`; `entropy` with `entropy_coef > 0`;
    `rollout_log_probs` with `use_tis` or `use_rs`; `tis_batch_mean` (one float for the whole
    optimizer step, `correction.tis_batch_mean`) with `tis_batch_normalize`; `values` (current
    value-head output, with grad), `old_values` and `returns` with advantage_estimator `ppo`.
    `entropy` or `rollout_log_probs` given without their feature are only logged.
    """
    _check_inputs(cfg, loss_mask, log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages,
                  entropy=entropy, ref_log_probs=ref_log_probs, rollout_log_probs=rollout_log_probs,
                  values=values, old_values=old_values, returns=returns)
    counts = dict(loss_mask=loss_mask, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=cfg.loss_scale_factor)
    metric_mode = "seq_mean_token_mean" if cfg.loss_agg_mode == "seq_mean_token_sum_norm" else cfg.loss_agg_mode
    pg_per_token, stats = _corrected_pg_loss(cfg, log_probs=log_probs, old_log_probs=old_log_probs,
                                             advantages=advantages, loss_mask=loss_mask,
                                             rollout_log_probs=rollout_log_probs, tis_batch_mean=tis_batch_mean)
    keep = stats.pop("keep", None)  # MIS / RS / veto rejection (B, T); None without correction
    # A rejected token leaves every policy term and training metric (slime rebuilds its reducer
    # with the rejection mask), but keeps its place in the denominators.
    reduce = _reducer(cfg.loss_agg_mode, counts, keep)
    reduce_metric = _reducer(metric_mode, counts, keep)
    reduce_all = _reducer(cfg.loss_agg_mode, counts, None)
    terms = {"pg_loss": reduce(pg_per_token)}
    loss = terms["pg_loss"]
    if cfg.use_kl_loss:
        ratio = None
        if cfg.use_unbiased_kl:  # pi_theta / pi_old, with gradient (slime)
            ratio = torch.exp((log_probs - old_log_probs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
        terms["kl_loss"] = reduce(kl_estimate(log_probs, ref_log_probs, cfg.kl_loss_type, importance_ratio=ratio))
        loss = loss + cfg.kl_loss_coef * terms["kl_loss"]
    if entropy is not None:
        terms["entropy_loss"] = reduce(entropy)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * terms["entropy_loss"]
    if values is not None:
        v_per_token, v_stats = value_loss(values, old_values, returns, value_clip=cfg.value_clip)
        terms["value_loss"] = reduce_all(v_per_token)  # the critic's loss: no rejection (slime)
        loss = loss + cfg.value_loss_coef * terms["value_loss"]
        stats = {**stats, "value_clipfrac": v_stats["clipped"]}
    with torch.no_grad():
        metrics = {key: value.detach() for key, value in terms.items()}
        metrics.update(_diagnostics(cfg, reduce_metric, _reducer(metric_mode, counts, None), stats,
                                    log_probs=log_probs, old_log_probs=old_log_probs,
                                    rollout_log_probs=rollout_log_probs, loss_mask=loss_mask))
        metrics["loss"] = loss.detach()
    return loss, metrics


def _corrected_pg_loss(cfg: AlgoConfig, *, log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor,
                       loss_mask: Tensor, rollout_log_probs: Tensor | None,
                       tis_batch_mean: float | None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token pg loss after TIS/MIS weights and OPSM masking, with all per-token stats."""
    pg_per_token, stats = _pg_loss(cfg, log_probs=log_probs, old_log_probs=old_log_probs,
                                   advantages=advantages, loss_mask=loss_mask)
    if cfg.use_tis or cfg.use_rs:
        weights, tis_stats = correction_weights(cfg, old_log_probs=old_log_probs, rollout_log_probs=rollout_log_probs,
                                                loss_mask=loss_mask, batch_mean=tis_batch_mean)
        pg_per_token = pg_per_token * weights
        stats = {**stats, **tis_stats}
    if cfg.use_opsm:
        keep = opsm_keep(log_probs, old_log_probs, advantages, loss_mask, cfg.opsm_delta)
        pg_per_token = pg_per_token * keep
        stats = {**stats, "opsm_clipfrac": 1 - keep}
    return pg_per_token, stats


def _reducer(mode: str, counts: dict, keep: Tensor | None) -> Callable[[Tensor], Tensor]:
    """`aggregate` with fixed counts; with `keep`, rejected tokens add 0 to the numerator only."""
    reduce = functools.partial(aggregate, mode=mode, **counts)
    return reduce if keep is None else (lambda x: reduce(x * keep))


def _diagnostics(cfg: AlgoConfig, reduce_metric, reduce_all, stats: dict[str, Tensor], *, log_probs: Tensor,
                 old_log_probs: Tensor, rollout_log_probs: Tensor | None, loss_mask: Tensor) -> dict[str, Tensor]:
    """Training metrics skip rejected tokens (`reduce_metric`); TIS/MIS, OPSM and value stats are
    over all trained tokens (`reduce_all`), as slime reports them."""
    metrics = {"ppo_kl": reduce_metric(old_log_probs - log_probs)}
    if "clipped" in stats:
        metrics["pg_clipfrac"] = reduce_metric(stats["clipped"])
    metrics.update({k: reduce_all(v) for k, v in stats.items() if k not in ("clipped", "ratio")})
    if rollout_log_probs is not None:
        metrics["train_rollout_logprob_abs_diff"] = reduce_metric((old_log_probs - rollout_log_probs).abs())
        if cfg.use_tis or cfg.use_rs:
            metrics.update(ratio_extrema(old_log_probs, rollout_log_probs, loss_mask))
    return metrics


def _pg_loss(cfg: AlgoConfig, **tensors: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    if not cfg.custom_loss_function:
        return POLICY_LOSSES[cfg.policy_loss](cfg, **tensors)
    out = resolve_hook(cfg.custom_loss_function, "loss")(cfg, **tensors)
    shape = tensors["loss_mask"].shape
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor) and out[0].shape == shape
            and isinstance(out[1], dict)):
        raise hook_error("loss", cfg.custom_loss_function,
                         f"must return (per-token loss of shape {tuple(shape)}, dict of per-token stats)")
    return out


def accumulate_metrics(total: dict[str, float], new: dict[str, float]) -> None:
    """Add one micro-batch's metrics into `total`: sums, except `*_min` / `*_max` (min / max)."""
    for key, value in new.items():
        if key.endswith("_min"):
            total[key] = min(total.get(key, math.inf), value)
        elif key.endswith("_max"):
            total[key] = max(total.get(key, -math.inf), value)
        else:
            total[key] = total.get(key, 0.0) + value


def _check_inputs(cfg: AlgoConfig, loss_mask: Tensor, **per_token: Tensor | None) -> None:
    required = {
        "ref_log_probs": (cfg.use_kl_loss, "use_kl_loss is set"),
        "entropy": (cfg.entropy_coef > 0, f"entropy_coef is {cfg.entropy_coef}"),
        "rollout_log_probs": (cfg.use_tis or cfg.use_rs, "use_tis or use_rs is set"),
        "values": (cfg.advantage_estimator == "ppo", "advantage_estimator is 'ppo'"),
    }
    for name, (needed, reason) in required.items():
        if needed and per_token[name] is None:
            raise ValueError(f"{reason} but {name} was not given")
    if per_token["values"] is not None and (per_token["old_values"] is None or per_token["returns"] is None):
        raise ValueError("values were given without old_values and returns (all three make the value loss)")
    for name, tensor in per_token.items():
        if tensor is not None and tensor.shape != loss_mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but loss_mask has {tuple(loss_mask.shape)}; "
                "every per-token input must be (B, T)"
            )
