"""The `[algo]` section: every advantage estimator, policy loss, KL, correction and sampling-filter
key (see README "Algorithms"). It lives apart from `config.py` only because it is the largest
section; `config.py` re-exports it. The math behind each key is in `miles_core/algo/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from miles_core.config.tree import check as _check


@dataclass(frozen=True, kw_only=True)
class AlgoConfig:
    # Advantages (miles_core/algo/advantages.py, gae.py)
    advantage_estimator: Literal["grpo", "dr_grpo", "gspo", "rloo", "reinforce_plus_plus",
                                 "reinforce_plus_plus_baseline", "ppo"] = "grpo"
    """`grpo` (r - mean) / (std + 1e-6) per group (DeepSeekMath); `dr_grpo` r - mean (Dr. GRPO); `gspo` as
    grpo, for policy_loss gspo; `rloo` leave-one-out baseline (Ahmadian et al. 2024); `reinforce_plus_plus`
    and `reinforce_plus_plus_baseline` (Hu 2025); `ppo` GAE over a value head (Schulman et al. 2016)."""
    normalize_advantages: bool = False
    """Whiten advantages over the trained tokens of the rollout batch (mean 0, std 1)."""
    gamma: float = 1.0
    """Per-token discount in [0, 1] for ppo (GAE) and reinforce_plus_plus returns."""
    lambd: float = 1.0
    """GAE lambda in [0, 1] for ppo (Schulman et al. 2016)."""
    custom_advantage_function: str = ""
    """`module:function` replacing the estimator: (rewards, group_size, **inputs) -> (N,) or (N, T)."""
    # Policy loss (miles_core/algo/losses.py)
    policy_loss: Literal["ppo_clip", "gspo", "cispo"] = "ppo_clip"
    """`ppo_clip` (Schulman et al. 2017); `gspo` sequence-level ratio (Zheng et al. 2025); `cispo` clipped
    IS weight x logp (MiniMax-M1 2025)."""
    eps_clip: float = 0.2
    """PPO lower clip: ratio >= 1 - eps_clip (Schulman et al. 2017); 1 disables the lower bound (CISPO)."""
    eps_clip_high: float = 0.2
    """PPO upper clip: ratio <= 1 + eps_clip_high; > eps_clip is DAPO's clip-higher."""
    eps_clip_c: float = 0.0
    """Dual-clip bound c > 1 for negative advantages (Ye et al. 2020); 0 disables."""
    custom_loss_function: str = ""
    """`module:function` replacing the per-token policy loss (contract in miles_core/algo/hooks.py)."""
    use_opsm: bool = False
    """Off-policy sequence masking (DeepSeek-V3.2): mask A < 0 tokens of rows drifted more than opsm_delta."""
    opsm_delta: float = 1e-4
    """OPSM threshold on a row's mean (old_logp - logp) over its trained tokens, in nats."""
    loss_agg_mode: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """Mean over all tokens; mean of per-sequence means; or mean of per-sequence sums / loss_scale_factor (Dr. GRPO)."""
    loss_scale_factor: int = 0
    """Tokens: the constant divisor of seq_mean_token_sum_norm, usually sampling.max_new_tokens (verl's name)."""
    value_clip: float = 0.2
    """PPO value clipping: V moves at most value_clip from V_old in the value loss; 0 disables."""
    value_loss_coef: float = 0.5
    """loss += value_loss_coef * value loss, for advantage_estimator ppo (value head)."""
    # KL to the reference model (miles_core/algo/kl.py)
    kl_coef: float = 0.0
    """KL reward shaping: token reward -= kl_coef * KL(policy || reference); ppo and reinforce_plus_plus* only."""
    use_kl_loss: bool = False
    """Add kl_loss_coef * KL(policy || reference) to the loss; needs a frozen reference model."""
    kl_loss_coef: float = 0.0
    """Weight of the KL loss: loss += kl_loss_coef * mean KL (with use_kl_loss)."""
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    """KL estimator of the KL loss and KL reward (Schulman 2020 k1/k2/k3; low_var_kl: k3 clamped to +-10, verl)."""
    use_unbiased_kl: bool = False
    """Weight the KL loss by pi / pi_old so that it is unbiased off-policy (DeepSeek-V3.2)."""
    ref_update_interval: int = 0
    """Copy the policy into the reference model every N rollout steps; 0 never."""
    entropy_coef: float = 0.0
    """Entropy bonus: loss -= entropy_coef * mean entropy."""
    # Train/inference mismatch correction (miles_core/algo/correction.py)
    use_tis: bool = False
    """Weight the pg loss by the importance ratio exp(train_logp - rollout_logp) (TIS/MIS, Yao et al. 2025)."""
    tis_level: Literal["token", "sequence", "geometric"] = "token"
    """Ratio per token, per sequence (product of token ratios) or their geometric mean."""
    tis_mode: Literal["truncate", "clip", "mask"] = "truncate"
    """`truncate` min(w, hi) (TIS); `clip` clamp(w, lo, hi); `mask` rejects tokens outside [lo, hi] (MIS;
    at token level this is IcePop, Ling team 2025)."""
    tis_clip_low: float = 0.0
    """Lower weight bound lo (clip and mask modes)."""
    tis_clip_high: float = 2.0
    """Upper weight bound hi."""
    use_rs: bool = False
    """Rejection sampling: drop tokens whose rs_level ratio is outside [rs_clip_low, rs_clip_high]."""
    rs_level: Literal["token", "sequence", "geometric"] = "token"
    """Level of the rejection-sampling ratio (as tis_level)."""
    rs_clip_low: float = 0.5
    """Lower ratio bound of rejection sampling."""
    rs_clip_high: float = 2.0
    """Upper ratio bound of rejection sampling."""
    tis_veto_threshold: float = 0.0
    """Drop a whole sequence if any token ratio is below this (e.g. 1e-4); 0 disables."""
    tis_batch_normalize: bool = False
    """Divide the weights by their mean over the optimizer-step batch so they average 1."""
    custom_tis_function: str = ""
    """`module:function` replacing the built-in weights (contract in miles_core/algo/hooks.py)."""
    # Sampling side (miles_core/algo/filters.py)
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards all agree; resample until rollout.batch_size groups are kept."""
    over_sampling_batch_size: int = 0
    """Prompts generated per dynamic-sampling round (with rollout.partial: groups in flight); 0 uses rollout.batch_size."""
    max_dynamic_sampling_rounds: int = 4
    """Rounds per step at most; after the last the step trains on the groups kept so far."""
    dynamic_filter: str = ""
    """`module:function` replacing the equal-rewards test: (rewards, group_size, **inputs) -> (G,) bool keep."""
    overlong_buffer_len: int = 0
    """DAPO soft overlong punishment: tokens before sampling.max_new_tokens over which the penalty ramps; 0 off."""
    overlong_penalty_factor: float = 1.0
    """Largest overlong penalty, in reward units, reached at sampling.max_new_tokens."""
    reward_post_process: str = ""
    """`module:function` applied to the (N,) rewards before advantages: (rewards, group_size, **inputs) -> (N,)."""

    def __post_init__(self) -> None:
        self._check_loss()
        self._check_kl()
        self._check_correction()
        self._check_sampling()

    def _check_loss(self) -> None:
        _check(0 <= self.eps_clip <= 1, f"eps_clip must be in [0, 1], got {self.eps_clip}")
        _check(self.eps_clip_high >= 0, f"eps_clip_high must be >= 0, got {self.eps_clip_high}")
        _check(self.eps_clip_c == 0 or self.eps_clip_c > 1, f"eps_clip_c must be 0 (off) or > 1, got {self.eps_clip_c}")
        for name in ("gamma", "lambd"):
            _check(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("opsm_delta", "value_clip", "value_loss_coef", "loss_scale_factor"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(self.loss_agg_mode != "seq_mean_token_sum_norm" or self.loss_scale_factor > 0,
               "loss_scale_factor must be > 0 with loss_agg_mode 'seq_mean_token_sum_norm' "
               "(the Dr. GRPO constant, e.g. sampling.max_new_tokens), got 0")
        _check(self.advantage_estimator != "gspo" or self.policy_loss == "gspo",
               f"advantage_estimator 'gspo' needs policy_loss = 'gspo', got '{self.policy_loss}'")

    def _check_kl(self) -> None:
        _check(self.kl_loss_coef >= 0, f"kl_loss_coef must be >= 0, got {self.kl_loss_coef}")
        _check(self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}")
        shaped = ("ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
        _check(self.kl_coef == 0 or self.advantage_estimator in shaped or bool(self.custom_advantage_function),
               f"kl_coef ({self.kl_coef}) shapes rewards only for advantage_estimator {', '.join(shaped)}; "
               f"got '{self.advantage_estimator}' (use use_kl_loss + kl_loss_coef instead)")
        _check(not self.use_unbiased_kl or self.use_kl_loss, "use_unbiased_kl needs use_kl_loss = true")
        _check(self.ref_update_interval >= 0, f"ref_update_interval must be >= 0, got {self.ref_update_interval}")
        _check(self.ref_update_interval == 0 or self.use_kl_loss or self.kl_coef > 0,
               "ref_update_interval needs a reference model: set use_kl_loss or kl_coef > 0")

    def _check_correction(self) -> None:
        for prefix in ("tis", "rs"):
            low, high = getattr(self, f"{prefix}_clip_low"), getattr(self, f"{prefix}_clip_high")
            _check(0 <= low < high,
                   f"{prefix}_clip_low and {prefix}_clip_high must satisfy 0 <= low < high, got {low} and {high}")
        _check(0 <= self.tis_veto_threshold < 1, f"tis_veto_threshold must be in [0, 1), got {self.tis_veto_threshold}")
        _check(self.use_tis or self.use_rs or self.tis_veto_threshold == 0,
               "tis_veto_threshold needs use_tis or use_rs")
        for name in ("tis_batch_normalize", "custom_tis_function"):
            _check(self.use_tis or not getattr(self, name), f"{name} needs use_tis = true")

    def _check_sampling(self) -> None:
        for name in ("over_sampling_batch_size", "overlong_buffer_len", "overlong_penalty_factor"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(self.over_sampling_batch_size <= 1 << 20,
               f"over_sampling_batch_size must be <= {1 << 20}, got {self.over_sampling_batch_size}")
        _check(self.max_dynamic_sampling_rounds >= 1,
               f"max_dynamic_sampling_rounds must be >= 1, got {self.max_dynamic_sampling_rounds}")
        _check(self.dynamic_sampling or not self.dynamic_filter, "dynamic_filter needs dynamic_sampling = true")
