"""Train/inference mismatch statistics: pure functions shared by the training loop's metrics and
`miles align-check`.

For the same tokens, s = log-prob under the rollout engine (the sampler) and t = log-prob under
the trainer. With delta = t - s over N tokens:
    mean |delta|, max |delta|, fraction of tokens with t == s bitwise,
    KL(sampler || trainer) estimated from the sampler's own tokens:
        k1 = mean(s - t),  k3 = mean(e^delta - 1 - delta)   (Schulman 2020; k3 >= 0, low variance)
    mean e^|delta| (NeMo-RL's gate: above ~1.05 in bf16 signals a broken setup).
Sums are kept separately from counts so micro-batches and batches can be merged exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from miles_core.errors import MilesError


@dataclass
class MismatchSums:
    num_tokens: float = 0.0
    abs_sum: float = 0.0
    max_abs: float = 0.0
    equal: float = 0.0
    k1_sum: float = 0.0
    k3_sum: float = 0.0
    exp_abs_sum: float = 0.0
    _pending: list = field(default_factory=list, repr=False, compare=False)

    def add(self, trainer_lp: torch.Tensor, rollout_lp: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate tokens where `mask` is 1 (all tokens when None); any shapes, same for all three.
        Counted when the sums are next read: reading them syncs with the GPU, which a trainer
        should do once a step, not between micro-batches."""
        self._pending.append((trainer_lp.detach(), rollout_lp.detach(), mask))

    def _count_pending(self) -> None:
        pending, self._pending = self._pending, []
        for trainer_lp, rollout_lp, mask in pending:
            self._count(trainer_lp, rollout_lp, mask)

    def _count(self, trainer_lp: torch.Tensor, rollout_lp: torch.Tensor, mask: torch.Tensor | None) -> None:
        t, s = trainer_lp.double(), rollout_lp.to(trainer_lp.device).double()
        keep = torch.ones_like(t, dtype=torch.bool) if mask is None else mask.to(t.device) > 0
        delta = (t - s)[keep]
        if delta.numel() == 0:
            return
        self.num_tokens += delta.numel()
        self.abs_sum += float(delta.abs().sum())
        self.max_abs = nan_max(self.max_abs, float(delta.abs().max()))
        self.equal += float((trainer_lp[keep] == rollout_lp.to(trainer_lp.device)[keep]).sum())
        self.k1_sum += float((-delta).sum())
        self.k3_sum += float((delta.exp() - 1 - delta).sum())
        self.exp_abs_sum += float(delta.abs().exp().sum())

    def merge(self, other: MismatchSums) -> None:
        self._count_pending()
        other._count_pending()
        for name in ("num_tokens", "abs_sum", "equal", "k1_sum", "k3_sum", "exp_abs_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_abs = nan_max(self.max_abs, other.max_abs)

    def metrics(self) -> dict[str, float]:
        self._count_pending()
        n = max(self.num_tokens, 1.0)
        return {
            "mean_abs_diff": self.abs_sum / n,
            "max_abs_diff": self.max_abs,
            "bitwise_equal": self.equal / n,
            "kl_k1": self.k1_sum / n,
            "kl_k3": self.k3_sum / n,
            "mean_exp_abs_diff": self.exp_abs_sum / n,
            "num_tokens": self.num_tokens,
        }


def nan_max(*values: float) -> float:
    """`max` that returns NaN when any value is NaN (builtin `max(0.0, nan)` is 0.0)."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def check_true_on_policy(cfg, metrics: dict[str, float], step: int) -> None:
    """With `alignment.true_on_policy`, stop the run at the first step where the trainer's
    log-probs differ from the engine's in any bit."""
    if not cfg.true_on_policy or "train/train_rollout_logprob_max_abs_diff" not in metrics:
        return
    worst = metrics["train/train_rollout_logprob_max_abs_diff"]
    if worst != 0.0:
        equal = metrics["train/train_rollout_logprob_bitwise_equal"]
        raise MilesError(f"true_on_policy: at step {step} trainer and engine log-probs differ (max |delta| = "
                         f"{worst:.3e}, {equal:.2%} of tokens bitwise equal); run `miles align-check` to find where")
