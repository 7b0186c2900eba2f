"""The native PyTorch trainer: micro-batched policy-gradient steps on one device.

Weights and AdamW state are fp32; `compute_dtype = "bfloat16"` runs forward/backward under
autocast. Losses use global token/sequence counts as denominators, so summing micro-batch
losses gives exactly the full-batch loss and gradient accumulation needs no rescaling.
With one optimizer step per rollout the "old" log-probs equal the current ones, so they are
taken (detached) from the training forward itself instead of a second pass.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from miles_core.algo import policy_loss
from miles_core.config import AlgoConfig, TrainConfig
from miles_core.models.loading import DTYPES
from miles_core.train.batch import (
    TrainBatch,
    micro_batches,
    pad_ragged,
    response_log_probs,
    shared_prefix_log_probs,
    shared_prefix_micro_batches,
)
from miles_core.train.optim import build_optimizer


class NativeTrainer:
    """`TrainBackend` for a native model in this process."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, algo: AlgoConfig, *, temperature: float,
                 total_steps: int, reference: nn.Module | None = None) -> None:
        self.model, self.cfg, self.algo = model.train(), cfg, algo
        self.reference = reference
        self.temperature = temperature if temperature > 0 else 1.0
        self.optimizer, self.scheduler = build_optimizer(model.parameters(), cfg, total_steps)
        self.device = next(model.parameters()).device
        self.num_optimizer_steps = 0

    def _autocast(self):
        dtype = DTYPES[self.cfg.compute_dtype]
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _forward(self, model: nn.Module, batch: TrainBatch, indices: list[int]):
        forward = shared_prefix_log_probs if self.cfg.share_prompt_prefix else response_log_probs
        with self._autocast():
            return forward(
                model, [batch.tokens[i] for i in indices], [batch.response_lengths[i] for i in indices],
                temperature=self.temperature, chunk_size=self.cfg.logprob_chunk_size,
            )

    def _micro_batches(self, batch: TrainBatch) -> list[list[int]]:
        if self.cfg.share_prompt_prefix:
            return shared_prefix_micro_batches(batch.tokens, batch.response_lengths, self.cfg.max_tokens_per_micro_batch)
        return micro_batches([len(t) for t in batch.tokens], self.cfg.max_tokens_per_micro_batch)

    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch, *, reference: bool = False) -> list[torch.Tensor]:
        model = self.reference if reference else self.model
        if model is None:
            raise ValueError("no reference model: enable algo.use_kl_loss to keep one")
        out: list[torch.Tensor | None] = [None] * len(batch)
        for indices in self._micro_batches(batch):
            logps, _ = self._forward(model, batch, indices)
            for i, logp in zip(indices, logps):
                out[i] = logp.float().cpu()
        return out

    def train_rollout(self, batch: TrainBatch) -> dict[str, float]:
        if self.algo.use_kl_loss:
            batch.ref_log_probs = self.compute_log_probs(batch, reference=True)
        if self.cfg.num_steps_per_rollout > 1:
            batch.old_log_probs = self.compute_log_probs(batch)
        steps = torch.arange(len(batch)).tensor_split(self.cfg.num_steps_per_rollout)
        totals: dict[str, float] = defaultdict(float)
        for indices in steps:
            for key, value in self.train_step(batch.select(indices.tolist())).items():
                totals[key] += value / len(steps)
        return dict(totals)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step over `batch`, accumulated over micro-batches."""
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens, num_seqs = max(batch.num_loss_tokens, 1.0), float(len(batch))
        metrics: dict[str, float] = defaultdict(float)
        for indices in self._micro_batches(batch):
            for key, value in self._micro_step(batch, indices, num_tokens, num_seqs).items():
                metrics[key] += value
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else float("inf")
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.num_optimizer_steps += 1
        return dict(metrics)

    def _micro_step(self, batch: TrainBatch, indices: list[int], num_tokens: float, num_seqs: float) -> dict[str, float]:
        logps, entropies = self._forward(self.model, batch, indices)
        pad = lambda values: pad_ragged([values[i] for i in indices]).to(self.device)  # noqa: E731
        log_probs, mask = pad_ragged(logps).float(), pad(batch.loss_masks)
        old = pad(batch.old_log_probs) if batch.old_log_probs is not None else log_probs.detach()
        loss, metrics = policy_loss(
            self.algo, log_probs=log_probs, old_log_probs=old, advantages=pad(batch.advantages),
            loss_mask=mask, num_tokens=num_tokens, num_seqs=num_seqs,
            entropy=pad_ragged(entropies).float(),
            ref_log_probs=pad(batch.ref_log_probs) if batch.ref_log_probs is not None else None,
        )
        loss.backward()
        if batch.rollout_log_probs is not None:
            diff = (log_probs.detach() - pad(batch.rollout_log_probs)).abs()
            metrics["train_rollout_logprob_abs_diff"] = float((diff * mask).sum() / num_tokens)
        return metrics

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in self.model.named_parameters():  # shared (tied) parameters appear once
            yield name, param.detach()

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "num_optimizer_steps": self.num_optimizer_steps,
        }, directory / "trainer_state.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "trainer_state.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.num_optimizer_steps = state["num_optimizer_steps"]
