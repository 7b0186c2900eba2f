"""From a step's scored samples to the trainer's batch, called by the loop:

reward shaping (`post_process_rewards`: overlong penalty, then the hook), the no-grad passes the
estimator needs (rollout-policy and reference log-probs for the KL reward, critic values for
PPO), then `estimate_advantages` (advantages, and PPO's value targets).

The math lives in `algo/`; this module only decides what is computed, in which order, on what.
"""

from __future__ import annotations

import torch

from miles_core.algo import estimate_advantages, kl_estimate, post_process_rewards
from miles_core.config import MilesConfig
from miles_core.metrics import token_means
from miles_core.rl.manager import raw_rewards
from miles_core.sample import Sample
from miles_core.train import needs_critic
from miles_core.train.batch import TrainBatch, pad_ragged
from miles_core.train.finite import finite_float32
from miles_core.train.protocol import TrainBackend


def prepare_train_batch(cfg: MilesConfig, trainer: TrainBackend, samples: list[Sample]) -> tuple[TrainBatch, dict[str, float]]:
    """(TrainBatch with advantages, `rollout/*` metrics of what enters the update)."""
    algo, group = cfg.algo, cfg.sampling.n_samples_per_prompt
    batch = TrainBatch.from_samples(samples)
    raw = torch.tensor(raw_rewards(samples, cfg.reward), dtype=torch.float64)  # float32 sums overflow past 1e38
    rewards = post_process_rewards(algo, raw, group, samples=samples,
                                   response_lengths=torch.tensor(batch.response_lengths),
                                   max_response_len=cfg.sampling.max_new_tokens)
    if algo.kl_coef > 0:  # KL reward: the rollout policy's and the reference's log-probs
        batch.old_log_probs = trainer.compute_log_probs(batch)
        batch.ref_log_probs = trainer.compute_log_probs(batch, reference=True)
    if needs_critic(algo):
        batch.values = trainer.compute_values(batch)
    pad = lambda values: None if values is None else pad_ragged(values)  # noqa: E731
    mask = pad_ragged(batch.loss_masks)
    advantages, returns = estimate_advantages(algo, rewards, group, loss_mask=mask, log_probs=pad(batch.old_log_probs),
                                              ref_log_probs=pad(batch.ref_log_probs), values=pad(batch.values),
                                              samples=samples)
    advantages, returns = finite_float32("advantages", advantages), finite_float32("returns", returns)
    batch.advantages = _unpad(advantages, batch.response_lengths)
    batch.returns = None if returns is None else _unpad(returns, batch.response_lengths)
    return batch, _update_metrics(cfg, batch, rewards, advantages, returns)


def _update_metrics(cfg: MilesConfig, batch: TrainBatch, rewards: torch.Tensor, advantages: torch.Tensor,
                    returns: torch.Tensor | None) -> dict[str, float]:
    """`rollout/*` means of what enters the update (token means over the trained tokens)."""
    per_token = {"advantages": advantages}
    if returns is not None:
        per_token.update(returns=returns, values=pad_ragged(batch.values))
    if cfg.algo.kl_coef > 0:
        per_token["ref_kl"] = kl_estimate(pad_ragged(batch.old_log_probs), pad_ragged(batch.ref_log_probs),
                                          cfg.algo.kl_loss_type)
    metrics = token_means(pad_ragged(batch.loss_masks), **per_token)
    if cfg.algo.overlong_buffer_len > 0 or cfg.algo.reward_post_process:
        metrics["rollout/shaped_reward"] = float(rewards.mean())
    return metrics


def _unpad(padded: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return [padded[i, :length] for i, length in enumerate(lengths)]
