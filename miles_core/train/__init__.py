"""Trainers behind the `TrainBackend` protocol, looked up by `train.backend`.

`TRAIN_BACKENDS` maps a backend name to a factory with `build_trainer`'s signature. Every caller
(training, align-check) builds its trainer through `build_trainer`; a new backend (FSDP2,
megatron-core) registers here and nowhere else.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import nn

from miles_core.config import AlgoConfig, TrainConfig
from miles_core.errors import MilesError, one_of
from miles_core.train.critic import Critic
from miles_core.train.native import NativeTrainer
from miles_core.train.protocol import TrainBackend


class TrainerFactory(Protocol):
    def __call__(self, cfg: TrainConfig, algo: AlgoConfig, model: nn.Module, *, temperature: float,
                 total_steps: int, reference: nn.Module | None = None) -> TrainBackend: ...


def needs_reference(algo: AlgoConfig) -> bool:
    """A frozen reference model is kept for the KL loss and for KL reward shaping."""
    return algo.use_kl_loss or algo.kl_coef > 0


def needs_critic(algo: AlgoConfig) -> bool:
    """A value model is kept for PPO (GAE advantages and the value loss)."""
    return algo.advantage_estimator == "ppo"


def _frozen_reference(algo: AlgoConfig, model: nn.Module, reference: nn.Module | None) -> nn.Module | None:
    """`reference`, or a copy of `model`'s starting weights, frozen in fp32; None when unused."""
    if not needs_reference(algo):
        return None
    reference = copy.deepcopy(model) if reference is None else reference
    return reference.to(torch.float32).requires_grad_(False).eval()


def _native(cfg: TrainConfig, algo: AlgoConfig, model: nn.Module, *, temperature: float,
            total_steps: int, reference: nn.Module | None = None) -> TrainBackend:
    """Keeps the model in fp32. When the KL loss or the KL reward is on, the reference model is
    `reference` (`model.ref_source`) or else a frozen copy of the initial weights; PPO adds a
    critic (`critic.py`) from the same weights."""
    model = model.to(torch.float32)
    reference = _frozen_reference(algo, model, reference)
    critic = Critic(model, cfg, total_steps) if needs_critic(algo) else None
    return NativeTrainer(model, cfg, algo, temperature=temperature, total_steps=total_steps,
                         reference=reference, critic=critic)


def _megatron(cfg: TrainConfig, algo: AlgoConfig, model: nn.Module, *, temperature: float,
              total_steps: int, reference: nn.Module | None = None) -> TrainBackend:
    """A megatron-core GPTModel holding `model`'s weights (`megatron.py`); the reference, when
    kept, is another one built from `reference` or else from the same starting weights. Rank 0
    of several (tensor parallelism) gets the leader (`leader.py`)."""
    try:
        import megatron.core  # noqa: F401  (an optional dependency)
    except ImportError as err:
        raise MilesError(f"train.backend = 'megatron' needs megatron-core ({err}); install the extra: "
                         "pip install 'miles[megatron]'") from None
    from miles_core.train.leader import lead
    from miles_core.train.megatron import MegatronTrainer

    if not needs_reference(algo):
        reference = None
    elif reference is None:
        reference = model
    return lead(MegatronTrainer(model, cfg, algo, temperature=temperature, total_steps=total_steps,
                                reference=reference))


def _fsdp(cfg: TrainConfig, algo: AlgoConfig, model: nn.Module, *, temperature: float,
          total_steps: int, reference: nn.Module | None = None) -> TrainBackend:
    """The native trainer's math on the ranks of the process group under FSDP2 (`fsdp.py`); a
    one-rank group when none is started. Rank 0 of several gets the leader (`leader.py`)."""
    from miles_core.train.fsdp import FSDPTrainer
    from miles_core.train.leader import lead

    model = model.to(torch.float32)
    reference = _frozen_reference(algo, model, reference)
    return lead(FSDPTrainer(model, cfg, algo, temperature=temperature, total_steps=total_steps, reference=reference))


TRAIN_BACKENDS: dict[str, TrainerFactory] = {"native": _native, "fsdp": _fsdp, "megatron": _megatron}


def build_trainer(cfg: TrainConfig, algo: AlgoConfig, model: nn.Module, *, temperature: float,
                  total_steps: int, reference: nn.Module | None = None) -> TrainBackend:
    """The trainer named by `cfg.backend`, taking ownership of `model` (and of `reference`, the
    reference model when it is not the starting weights)."""
    if cfg.backend not in TRAIN_BACKENDS:
        raise one_of("train.backend", cfg.backend, tuple(TRAIN_BACKENDS))
    return TRAIN_BACKENDS[cfg.backend](cfg, algo, model, temperature=temperature, total_steps=total_steps,
                                       reference=reference)
