"""Trainers behind the `TrainBackend` protocol (native PyTorch now; megatron-core later)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from miles_core.config import AlgoConfig, TrainConfig

if TYPE_CHECKING:
    from torch import nn

    from miles_core.train.protocol import TrainBackend


def build_trainer(cfg: TrainConfig, algo: AlgoConfig, model: nn.Module, *, temperature: float,
                  total_steps: int) -> TrainBackend:
    """The trainer named by `cfg.backend`, taking ownership of `model` (kept in fp32).

    A frozen copy of the initial weights becomes the reference model when the KL loss is on.
    """
    import torch

    from miles_core.train.native import NativeTrainer

    model = model.to(torch.float32)
    reference = copy.deepcopy(model).requires_grad_(False).eval() if algo.use_kl_loss else None
    return NativeTrainer(model, cfg, algo, temperature=temperature, total_steps=total_steps,
                         reference=reference)
