"""Advantage estimators: per-sample rewards (plus per-token inputs) in, advantages out.

Shape legend: N samples of one rollout step (prompt-major: the `group_size` responses to one
prompt are consecutive), G = N / group_size groups, T response tokens (right padded).

Estimators (`algo.advantage_estimator`), r = scalar reward of a response:
  grpo       A_i = (r_i - mean(group)) / (std(group) + 1e-6), unbiased std as slime and verl
             (Shao et al. 2024, DeepSeekMath). `gspo` is the same advantage (Zheng et al. 2025,
             GSPO); its sequence-level ratio lives in the loss.
  dr_grpo    A_i = r_i - mean(group) (Liu et al. 2025, Dr. GRPO).
  rloo       A_i = r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean(group)) (Ahmadian et al. 2024).
  reinforce_plus_plus  token rewards -kl_coef * kl_t, plus r at the last trained token;
             discounted returns with `gamma`; whitened over the batch (Hu 2025, REINFORCE++).
  reinforce_plus_plus_baseline  (r_i - mean(group)) - kl_coef * kl_t per token, whitened over
             the batch (REINFORCE++-baseline, same paper).
  ppo        GAE(gamma, lambd) over token rewards as for reinforce_plus_plus and the critic's
             values (Schulman et al. 2017, 2016); see `gae.py`.
`normalize_advantages` whitens over the trained tokens of the whole batch (mean 0, unbiased
variance 1, as slime's `distributed_masked_whiten`); `algo.normalize_advantages` applies it to any
estimator's output except the REINFORCE++ variants, which whiten once already: a second pass is
not a no-op (it removes the 1e-8 variance damping, turning +-0.05 into +-0.71 on near-constant
returns). Deviation from slime: its REINFORCE++ whitens only with `normalize_advantages`; ours
always does, as the paper.

Registry contract: every entry of `ADVANTAGE_ESTIMATORS` (and a custom advantage hook) is
`(rewards (N,), group_size, **inputs) -> (N,) or (N, T)` and ignores inputs it has no use for.
Inputs: `loss_mask` (N, T); `token_kl` (N, T), KL(policy || reference) per token; `values`
(N, T), the critic's values at rollout; floats `kl_coef`, `gamma`, `lambd`. An estimator missing
an input it needs raises ValueError naming it. `estimate_advantages(cfg, ...)` builds these
inputs from the config and is what the loop calls.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from miles_core.algo.gae import discounted_returns, gae
from miles_core.algo.hooks import hook_error, resolve_hook
from miles_core.algo.kl import kl_estimate
from miles_core.config import AlgoConfig
from miles_core.errors import one_of

AdvantageEstimator = Callable[..., Tensor]
WHITEN_EPS = 1e-8


def group_advantages(rewards: Tensor, group_size: int, *, normalize_std: bool, eps: float = 1e-6) -> Tensor:
    """(N,) rewards -> (N,) advantages centred (and optionally std-scaled) within each group."""
    _check_groups(rewards, group_size)
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    if group_size == 1:
        # A lone sample has no baseline to compare with; std would be NaN (0 degrees of freedom).
        return torch.zeros_like(rewards)
    grouped = rewards.view(-1, group_size)  # (G, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (_group_std(grouped) + eps)
    return centred.view(-1)


def _group_std(grouped: Tensor) -> Tensor:
    """(G, group_size) -> (G, 1) unbiased std; for rewards whose squares overflow (past ~1e19 in
    float32, ~1e154 in float64) computed on rewards scaled by the group's largest |reward|."""
    std = grouped.std(dim=1, keepdim=True)
    if bool(torch.isfinite(std).all()) or not bool(torch.isfinite(grouped).all()):
        return std
    scale = grouped.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(grouped.dtype).tiny)
    return (grouped / scale).std(dim=1, keepdim=True) * scale


def normalize_advantages(advantages: Tensor, loss_mask: Tensor, eps: float = WHITEN_EPS) -> Tensor:
    """(N, T) -> (N, T) whitened over the trained tokens of the batch; 0 where the mask is 0."""
    mask = (loss_mask > 0).to(advantages.dtype)
    count = mask.sum()
    if count == 0:
        return torch.zeros_like(advantages)
    mean = (advantages * mask).sum() / count
    var = ((advantages - mean).square() * mask).sum() / count
    if count >= 2:
        var = var * count / (count - 1)  # Bessel's correction, as slime
    return (advantages - mean) * torch.rsqrt(var + eps) * mask


def _check_groups(rewards: Tensor, group_size: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"number of rewards ({rewards.numel()}) is not a multiple of group_size ({group_size})")


def _need(inputs: dict, key: str, estimator: str, what: str) -> Tensor:
    if inputs.get(key) is None:
        raise ValueError(f"advantage estimator '{estimator}' needs input '{key}' ({what})")
    return inputs[key]


def _token_kl(inputs: dict, estimator: str, mask: Tensor) -> Tensor:
    if inputs.get("kl_coef", 0.0) == 0:
        return torch.zeros_like(mask)
    return _need(inputs, "token_kl", estimator, "(N, T) KL(policy || reference) per token, since kl_coef > 0")


def token_level_rewards(rewards: Tensor, loss_mask: Tensor, token_kl: Tensor, kl_coef: float) -> Tensor:
    """(N, T): -kl_coef * kl on trained tokens, plus the scalar reward on each row's last trained token."""
    mask = (loss_mask > 0).to(torch.float32 if not token_kl.is_floating_point() else token_kl.dtype)
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=mask.dtype)
    last = (mask * positions).argmax(dim=1, keepdim=True)  # (N, 1); row of no tokens -> 0, reward dropped
    has_tokens = mask.sum(dim=1, keepdim=True) > 0
    reward = torch.where(has_tokens, rewards.to(mask.dtype)[:, None], 0)
    return (-kl_coef * token_kl * mask).scatter_add(1, last, reward)


def _grpo(rewards: Tensor, group_size: int, **inputs) -> Tensor:
    return group_advantages(rewards, group_size, normalize_std=True)


def _dr_grpo(rewards: Tensor, group_size: int, **inputs) -> Tensor:
    return group_advantages(rewards, group_size, normalize_std=False)


def _rloo(rewards: Tensor, group_size: int, **inputs) -> Tensor:
    centred = group_advantages(rewards, group_size, normalize_std=False)
    return centred * group_size / (group_size - 1) if group_size > 1 else centred


def _reinforce_plus_plus(rewards: Tensor, group_size: int, **inputs) -> Tensor:
    mask = _need(inputs, "loss_mask", "reinforce_plus_plus", "(N, T) trained tokens")
    token_rewards = token_level_rewards(rewards, mask, _token_kl(inputs, "reinforce_plus_plus", mask),
                                        inputs.get("kl_coef", 0.0))
    returns = discounted_returns(token_rewards, inputs.get("gamma", 1.0), mask)
    return normalize_advantages(returns, mask)


def _reinforce_plus_plus_baseline(rewards: Tensor, group_size: int, **inputs) -> Tensor:
    mask = _need(inputs, "loss_mask", "reinforce_plus_plus_baseline", "(N, T) trained tokens")
    token_kl = _token_kl(inputs, "reinforce_plus_plus_baseline", mask)
    centred = group_advantages(rewards, group_size, normalize_std=False)[:, None]  # (N, 1)
    return normalize_advantages(centred - inputs.get("kl_coef", 0.0) * token_kl, mask)


def _ppo(rewards: Tensor, group_size: int, **inputs) -> Tensor:
    mask = _need(inputs, "loss_mask", "ppo", "(N, T) trained tokens")
    values = _need(inputs, "values", "ppo", "(N, T) critic values at rollout time")
    token_rewards = token_level_rewards(rewards, mask, _token_kl(inputs, "ppo", mask), inputs.get("kl_coef", 0.0))
    advantages, _ = gae(token_rewards.to(values.dtype), values, mask,
                        gamma=inputs.get("gamma", 1.0), lambd=inputs.get("lambd", 1.0))
    return advantages


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "gspo": _grpo,
    "rloo": _rloo,
    "reinforce_plus_plus": _reinforce_plus_plus,
    "reinforce_plus_plus_baseline": _reinforce_plus_plus_baseline,
    "ppo": _ppo,
}
# Estimators whose output is already whitened: `normalize_advantages` must not whiten them again
# (a second pass rescales to unit variance and undoes the 1e-8 damping of near-constant returns).
SELF_WHITENING = ("reinforce_plus_plus", "reinforce_plus_plus_baseline")
# Estimators that read `kl_coef` (KL as a token reward, "reward shaping").
KL_REWARD_ESTIMATORS = ("ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")


def compute_advantages(name: str, rewards: Tensor, group_size: int, **inputs) -> Tensor:
    """Run the estimator registered as `name`; (N,) or (N, T) advantages (see module docstring)."""
    if name not in ADVANTAGE_ESTIMATORS:
        # Names are checked against AlgoConfig when the recipe loads; reaching here is a bug in
        # the caller, hence ValueError (with the same one-line wording as user errors).
        raise ValueError(str(one_of("advantage estimator", name, ADVANTAGE_ESTIMATORS)))
    return ADVANTAGE_ESTIMATORS[name](rewards, group_size, **inputs)


def estimate_advantages(
    cfg: AlgoConfig,
    rewards: Tensor,
    group_size: int,
    *,
    loss_mask: Tensor,
    log_probs: Tensor | None = None,
    ref_log_probs: Tensor | None = None,
    values: Tensor | None = None,
    **extra,
) -> tuple[Tensor, Tensor | None]:
    """Advantages (N, T) and, for `ppo`, value targets `returns` (N, T; else None) for one step.

    `log_probs` / `ref_log_probs` (N, T, policy at rollout and reference) are needed when
    `cfg.kl_coef > 0`; `values` (N, T) for `ppo`. `extra` keywords go to the estimator as they
    are (a custom advantage hook may use them, e.g. `samples`). The hook named by
    `cfg.custom_advantage_function` replaces the built-in estimator.
    """
    inputs = dict(extra, loss_mask=loss_mask, values=values, kl_coef=cfg.kl_coef, gamma=cfg.gamma, lambd=cfg.lambd)
    if cfg.kl_coef > 0:
        if log_probs is None or ref_log_probs is None:
            raise ValueError(f"kl_coef is {cfg.kl_coef}: pass log_probs and ref_log_probs for the KL reward")
        inputs["token_kl"] = kl_estimate(log_probs, ref_log_probs, cfg.kl_loss_type) * loss_mask
    if cfg.custom_advantage_function:
        hook = resolve_hook(cfg.custom_advantage_function, "advantage")
        advantages = hook(rewards, group_size, **inputs)
        if not isinstance(advantages, Tensor) or advantages.shape not in (rewards.shape, loss_mask.shape):
            got = tuple(advantages.shape) if isinstance(advantages, Tensor) else type(advantages).__name__
            raise hook_error("advantage", cfg.custom_advantage_function,
                             f"returned {got}; expected a tensor of shape (N,) or (N, T) = "
                             f"{tuple(rewards.shape)} or {tuple(loss_mask.shape)}")
    else:
        advantages = compute_advantages(cfg.advantage_estimator, rewards, group_size, **inputs)
    advantages = broadcast_to_tokens(advantages, loss_mask)
    returns = None
    if cfg.advantage_estimator == "ppo":
        returns = (advantages + _need(inputs, "values", "ppo", "(N, T) critic values")) * (loss_mask > 0)
    if cfg.normalize_advantages and (cfg.custom_advantage_function or cfg.advantage_estimator not in SELF_WHITENING):
        advantages = normalize_advantages(advantages, loss_mask)
    return advantages, returns


def broadcast_to_tokens(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """(N,) per-sample or (N, T) per-token advantages -> (N, T), zero where `loss_mask` is 0."""
    if advantages.dim() == 1 and advantages.shape[0] == loss_mask.shape[0]:
        advantages = advantages.unsqueeze(1)  # (N, 1), broadcast over T below
    elif advantages.shape != loss_mask.shape:
        raise ValueError(
            f"advantages of shape {tuple(advantages.shape)} do not fit loss_mask of shape "
            f"{tuple(loss_mask.shape)}; expected (N,) or (N, T)"
        )
    return advantages * loss_mask
