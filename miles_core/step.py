"""One rollout step's data path from the engine to the trainer, called by `loop.py`:

  collect_rollout      generate and score the step's samples; with `algo.dynamic_sampling`
                       (DAPO) in rounds of `over_sampling_batch_size` prompts until
                       `rollout.batch_size` groups with differing rewards are kept or
                       `max_dynamic_sampling_rounds` ran (the kept groups train; none kept
                       means the step does not train)
  prepare_train_batch  reward shaping (`post_process_rewards`: overlong penalty, then the hook),
                       the no-grad passes the estimator needs (rollout-policy and reference
                       log-probs for the KL reward, critic values for PPO), then
                       `estimate_advantages` (advantages, and PPO's value targets)

The math lives in `algo/`; this module only decides what is computed, in which order, on what.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miles_core.config import MilesConfig
from miles_core.sample import Sample


@dataclass
class StepRollout:
    samples: list[Sample]
    """The samples that train: every one generated, or the kept groups under dynamic sampling."""
    generated: list[Sample]
    """Every sample generated (or loaded) this step, for the `rollout/*` metrics."""
    metrics: dict[str, float]
    """`rollout/*` of the generated samples and, under dynamic sampling, `rollout/dynamic_sampling_*`."""


def collect_rollout(cfg: MilesConfig, parts, step: int) -> StepRollout:
    """The step's scored samples: loaded (no engine), one batch, or dynamic-sampling rounds."""
    if parts.engine is None:
        samples = parts.load_rollout(step)
        return _described(cfg, samples, samples, {"rollout/reward_failures": _score(cfg, samples)})
    if cfg.algo.dynamic_sampling:
        return _dynamic_sampling(cfg, parts, step)
    samples = _numbered(_flatten(parts.generate_groups(cfg.rollout.batch_size)), cfg, step)
    return _described(cfg, samples, samples, {"rollout/reward_failures": _score(cfg, samples)})


def _described(cfg: MilesConfig, samples: list[Sample], generated: list[Sample],
               metrics: dict[str, float]) -> StepRollout:
    from miles_core.metrics import rollout_metrics

    described = rollout_metrics(generated, raw_rewards(cfg, generated), cfg.sampling.n_samples_per_prompt)
    return StepRollout(samples, generated, {**described, **metrics})


def _dynamic_sampling(cfg: MilesConfig, parts, step: int) -> StepRollout:
    from miles_core.algo import DynamicSamplingTally, keep_groups, round_size

    target, group = cfg.rollout.batch_size, cfg.sampling.n_samples_per_prompt
    tally, kept, generated, failures = DynamicSamplingTally(), [], [], 0
    while not tally.done(target, cfg.algo.max_dynamic_sampling_rounds):
        groups = parts.generate_groups(round_size(cfg.algo, target))
        samples = _flatten(groups)
        failures += _score(cfg, samples)
        rewards = torch.tensor(raw_rewards(cfg, samples), dtype=torch.float64)  # float32 sums overflow past 1e38
        keep = keep_groups(cfg.algo, rewards, group, samples=samples)
        tally = tally.add(keep)
        generated += samples
        kept += [g for g, k in zip(groups, keep.tolist()) if k]
    trained = kept[:target]
    metrics = {
        **tally.metrics(target),
        "rollout/dynamic_sampling_trained_groups": float(len(trained)),
        "rollout/dynamic_sampling_skipped_step": float(not trained),
        "rollout/reward_failures": float(failures),
    }
    return _described(cfg, _numbered(_flatten(trained), cfg, step), generated, metrics)


def prepare_train_batch(cfg: MilesConfig, trainer, samples: list[Sample]):
    """(TrainBatch with advantages, `rollout/*` metrics of what enters the update)."""
    from miles_core.algo import estimate_advantages, post_process_rewards
    from miles_core.train import needs_critic
    from miles_core.train.finite import finite_float32
    from miles_core.train.batch import TrainBatch, pad_ragged

    algo, group = cfg.algo, cfg.sampling.n_samples_per_prompt
    batch = TrainBatch.from_samples(samples)
    rewards = torch.tensor(raw_rewards(cfg, samples), dtype=torch.float64)  # float32 sums overflow past 1e38
    rewards = post_process_rewards(algo, rewards, group, samples=samples,
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


def _update_metrics(cfg: MilesConfig, batch, rewards: torch.Tensor, advantages: torch.Tensor,
                    returns: torch.Tensor | None) -> dict[str, float]:
    """`rollout/*` means of what enters the update (token means over the trained tokens)."""
    from miles_core.algo import kl_estimate
    from miles_core.metrics import token_means
    from miles_core.train.batch import pad_ragged

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


def raw_rewards(cfg: MilesConfig, samples: list[Sample]) -> list[float]:
    """The task rewards (`reward.key` of dict rewards), before any shaping."""
    from miles_core.rewards import scalar_reward

    return [scalar_reward(s, cfg.reward) for s in samples]


def _score(cfg: MilesConfig, samples: list[Sample]) -> float:
    """Reward the samples that have none yet; returns how many reward calls failed."""
    from miles_core.rewards import compute_rewards

    return float(compute_rewards([s for s in samples if s.reward is None], cfg.reward).num_failed)


def _flatten(groups: list[list[Sample]]) -> list[Sample]:
    return [s for group in groups for s in group]


def _numbered(samples: list[Sample], cfg: MilesConfig, step: int) -> list[Sample]:
    """Position, group and rollout step of each sample, as trained (groups stay consecutive)."""
    for index, sample in enumerate(samples):
        sample.index, sample.group_index = index, index // cfg.sampling.n_samples_per_prompt
        sample.metadata["rollout_id"] = step
    return samples


def _unpad(padded: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return [padded[i, :length] for i, length in enumerate(lengths)]
