"""Sampling-side math: reward shaping before advantages and DAPO dynamic sampling.

Shape legend: N samples (prompt-major groups of `group_size`), G = N / group_size groups.

Overlong reward shaping (DAPO soft overlong punishment, Yu et al. 2025), L = response length,
L_max = the generation limit, L_cache = `overlong_buffer_len`, f = `overlong_penalty_factor`:
  0                                  if L <= L_max - L_cache
  -f * (L - (L_max - L_cache)) / L_cache   if L_max - L_cache < L <= L_max
  -f                                 if L > L_max
`post_process_rewards` adds it to the task reward, then runs the `algo.reward_post_process` hook.

Dynamic sampling (DAPO): a group whose rewards all agree (std <= 1e-6, unbiased std in fp64 as
slime's `check_reward_nonzero_std`; a group of one is dropped too) gives every sample a zero
GRPO advantage, so it is dropped and more prompts are sampled, `over_sampling_batch_size` at a
time, until `rollout.batch_size` groups are kept or `max_dynamic_sampling_rounds` rounds have
run. `DynamicSamplingTally` is the immutable accounting of those rounds; the loop owns the
generation and keeps the first `target` kept groups. The `algo.dynamic_filter` hook replaces
the built-in test and has its signature.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from miles_core.algo.hooks import hook_error, resolve_hook
from miles_core.config import AlgoConfig

ZERO_STD = 1e-6


def overlong_penalty(response_lengths: Tensor, max_len: int, buffer_len: int, factor: float) -> Tensor:
    """(N,) response lengths in tokens -> (N,) penalties in [-factor, 0] (module docstring)."""
    if buffer_len == 0:
        return torch.zeros(response_lengths.shape, dtype=torch.float32, device=response_lengths.device)
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"overlong buffer_len must be in [0, max_len = {max_len}], got {buffer_len}")
    exceed = response_lengths.float() - (max_len - buffer_len)
    return (-exceed / buffer_len * factor).clamp(-factor, 0.0)


def post_process_rewards(cfg: AlgoConfig, rewards: Tensor, group_size: int, *, response_lengths: Tensor,
                         max_response_len: int, **inputs) -> Tensor:
    """(N,) task rewards -> (N,) rewards for the advantage estimator: overlong penalty, then hook.
    float64 rewards stay float64 (large rewards overflow float32 in group sums)."""
    rewards = rewards if rewards.dtype == torch.float64 else rewards.float()
    if cfg.overlong_buffer_len > 0:
        rewards = rewards + overlong_penalty(response_lengths, max_response_len, cfg.overlong_buffer_len,
                                             cfg.overlong_penalty_factor).to(rewards.device)
    if not cfg.reward_post_process:
        return rewards
    hook = resolve_hook(cfg.reward_post_process, "reward_post_process")
    out = hook(rewards, group_size, response_lengths=response_lengths, **inputs)
    if not isinstance(out, Tensor) or out.shape != rewards.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise hook_error("reward_post_process", cfg.reward_post_process,
                         f"returned {got}; expected a tensor of shape (N,) = {tuple(rewards.shape)}")
    return out


def dynamic_sampling_keep(rewards: Tensor, group_size: int, **inputs) -> Tensor:
    """(N,) rewards -> (G,) bool, True for groups whose rewards are not all equal."""
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"expected (N,) rewards in groups of {group_size}, got shape {tuple(rewards.shape)}")
    grouped = rewards.to(torch.float64).view(-1, group_size)  # (G, group_size)
    if group_size == 1:
        return torch.zeros(grouped.shape[0], dtype=torch.bool, device=rewards.device)
    return grouped.std(dim=1) > ZERO_STD


def keep_groups(cfg: AlgoConfig, rewards: Tensor, group_size: int, **inputs) -> Tensor:
    """(G,) bool of the groups to keep: the `dynamic_filter` hook if set, else the std test."""
    if not cfg.dynamic_filter:
        return dynamic_sampling_keep(rewards, group_size, **inputs)
    out = resolve_hook(cfg.dynamic_filter, "dynamic_filter")(rewards, group_size, **inputs)
    num_groups = rewards.numel() // group_size
    if not isinstance(out, Tensor) or out.dtype != torch.bool or out.shape != (num_groups,):
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise hook_error("dynamic_filter", cfg.dynamic_filter,
                         f"returned {got}; expected a bool tensor of shape (G,) = ({num_groups},)")
    return out


def round_size(cfg: AlgoConfig, target: int) -> int:
    """Prompts (groups) to generate per dynamic-sampling round: over_sampling_batch_size or target."""
    return cfg.over_sampling_batch_size or target


@dataclass(frozen=True)
class DynamicSamplingTally:
    """Counts of one step's dynamic sampling; `add` returns the updated tally."""

    num_rounds: int = 0
    num_generated: int = 0
    """Groups generated so far."""
    num_kept: int = 0
    """Groups that passed the filter so far (may exceed the target; the surplus is not trained)."""

    def add(self, keep: Tensor) -> DynamicSamplingTally:
        return replace(self, num_rounds=self.num_rounds + 1, num_generated=self.num_generated + keep.numel(),
                       num_kept=self.num_kept + int(keep.sum()))

    def done(self, target: int, max_rounds: int) -> bool:
        """Enough groups kept, or the round cap reached (then the step trains on fewer groups)."""
        return self.num_kept >= target or self.num_rounds >= max_rounds

    def metrics(self, target: int) -> dict[str, float]:
        dropped = self.num_generated - self.num_kept
        return {
            "rollout/dynamic_sampling_rounds": float(self.num_rounds),
            "rollout/dynamic_sampling_generated_groups": float(self.num_generated),
            "rollout/dynamic_sampling_dropped_groups": float(dropped),
            "rollout/dynamic_sampling_drop_ratio": dropped / max(self.num_generated, 1),
            "rollout/dynamic_sampling_shortfall_groups": float(max(target - self.num_kept, 0)),
        }
