"""Trainers behind the `TrainBackend` protocol (native PyTorch now; megatron-core later)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from miles_core.config import AlgoConfig, TrainConfig

if TYPE_CHECKING:
    from torch import nn

    from miles_core.train.protocol import TrainBackend


def needs_reference(algo: AlgoConfig) -> bool:
    """A frozen reference model is kept for the KL loss and for KL reward shaping."""
    return algo.use_kl_loss or algo.kl_coef > 0


def needs_critic(algo: AlgoConfig) -> bool:
    """A value model is kept for PPO (GAE advantages and the value loss)."""
    return algo.advantage_estimator == "ppo"


def build_trainer(cfg: TrainConfig, algo: AlgoConfig, model: nn.Module, *, temperature: float,
                  total_steps: int) -> TrainBackend:
    """The trainer named by `cfg.backend`, taking ownership of `model` (kept in fp32).

    A frozen copy of the initial weights becomes the reference model when the KL loss or the KL
    reward is on; PPO adds a critic (`critic.py`) initialised from the same weights.
    """
    import torch

    from miles_core.train.critic import Critic
    from miles_core.train.native import NativeTrainer

    model = model.to(torch.float32)
    reference = copy.deepcopy(model).requires_grad_(False).eval() if needs_reference(algo) else None
    critic = Critic(model, cfg, total_steps) if needs_critic(algo) else None
    return NativeTrainer(model, cfg, algo, temperature=temperature, total_steps=total_steps,
                         reference=reference, critic=critic)
