"""The `TrainBackend` protocol: what the GRPO loop needs from a trainer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch

from miles_core.train.batch import TrainBatch


class TrainBackend(Protocol):
    def compute_log_probs(self, batch: TrainBatch, *, reference: bool = False) -> list[torch.Tensor]:
        """Per-sample log-probs of the response tokens (no gradient), of the policy or the reference."""

    def compute_values(self, batch: TrainBatch) -> list[torch.Tensor]:
        """Per-sample critic values of the response tokens (no gradient); PPO only."""

    def train_rollout(self, batch: TrainBatch) -> dict[str, float]:
        """All optimizer steps for one rollout; returns `train/*` metrics."""

    def last_pass_metrics(self) -> dict[str, float]:
        """What this backend measured in the last policy `compute_log_probs` pass beyond the
        log-probs (e.g. MoE `routing_agreement`); metrics only some backends have go here."""

    def skipped_notes(self) -> list[str]:
        """One line per optimizer step of the last `train_rollout` skipped for a non-finite loss
        or gradient norm (values and offending samples); empty when none was."""

    def offload_optimizer(self) -> int:
        """Move the optimizer state to host memory while a colocated engine generates
        (`engine.colocate`); returns the bytes moved off the GPU. `train_rollout` reloads it."""

    def reload_optimizer(self) -> None:
        """Put the optimizer state back on its device, the same bits (no-op unless offloaded)."""

    def update_reference(self) -> None:
        """Copy the policy's current weights into the reference model."""

    def export_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Current weights with HF names (tied weights once), for sync and checkpoints; may be
        the same `KeptWeights` tuple push after push (`models/kept_weights.py`)."""

    def save(self, directory: Path) -> None:
        """Trainer state for resuming: weights, optimizer, schedule, reference and critic
        models, the bad-step count. `directory` is new; write errors raise `OSError`."""

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote into this (identically configured) trainer."""
