"""The native PyTorch trainer: micro-batched policy-gradient steps on one device.

Weights and AdamW state are fp32. `compute_dtype = "bfloat16"` runs forward and backward on
bf16 copies of the weights (the cast is differentiable, so gradients reach the fp32 masters),
as FSDP's mixed precision does: activations are bf16 end to end exactly as in a bf16 inference
engine, which autocast would not give (it keeps the residual stream in fp32), so batch-invariant
kernels can make trainer and engine agree bit for bit. Losses use global token/sequence counts
as denominators, so summing micro-batch losses gives exactly the full-batch loss. With one
optimizer step per rollout the "old" log-probs equal the current ones, so they are taken
(detached) from the training forward itself instead of a second pass.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from miles_core.algo import policy_loss
from miles_core.config import AlgoConfig, TrainConfig
from miles_core.mismatch import MismatchSums
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


class _ResponseLogProbs(nn.Module):
    """Wraps the log-prob computation so `functional_call` can swap in cast weights for all of it
    (the lm_head weight is used outside the model's own forward)."""

    def __init__(self, model: nn.Module, forward: Callable, temperature: float, chunk_size: int) -> None:
        super().__init__()
        self.model, self.fn, self.temperature, self.chunk_size = model, forward, temperature, chunk_size

    def forward(self, tokens, response_lengths):
        return self.fn(self.model, tokens, response_lengths, temperature=self.temperature, chunk_size=self.chunk_size)


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

    def _forward(self, model: nn.Module, batch: TrainBatch, indices: list[int]):
        forward = shared_prefix_log_probs if self.cfg.share_prompt_prefix else response_log_probs
        module = _ResponseLogProbs(model, forward, self.temperature, self.cfg.logprob_chunk_size)
        args = ([batch.tokens[i] for i in indices], [batch.response_lengths[i] for i in indices])
        dtype = DTYPES[self.cfg.compute_dtype]
        if all(p.dtype == dtype for p in model.parameters()):
            return module(*args)
        cast = {f"model.{name}": p.to(dtype) for name, p in model.named_parameters()}
        return torch.func.functional_call(module, cast, args)

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
        # Train/rollout mismatch is measured on the weights that generated the rollout: the old
        # log-probs when computed, else the first (only) optimizer step's own forward.
        mismatch = MismatchSums()
        if self.cfg.num_steps_per_rollout > 1:
            batch.old_log_probs = self.compute_log_probs(batch)
            if batch.rollout_log_probs is not None:
                for old, rollout, mask in zip(batch.old_log_probs, batch.rollout_log_probs, batch.loss_masks):
                    mismatch.add(old, rollout, mask)
        steps = torch.arange(len(batch)).tensor_split(self.cfg.num_steps_per_rollout)
        totals: dict[str, float] = defaultdict(float)
        for index, indices in enumerate(steps):
            measure = mismatch if self.cfg.num_steps_per_rollout == 1 else None
            for key, value in self.train_step(batch.select(indices.tolist()), measure).items():
                totals[key] += value / len(steps)
        if batch.rollout_log_probs is not None:
            totals.update(mismatch_metrics(mismatch))
        return dict(totals)

    def train_step(self, batch: TrainBatch, mismatch: MismatchSums | None = None) -> dict[str, float]:
        """One optimizer step over `batch`, accumulated over micro-batches; the forward's log-probs
        are compared with the rollout's into `mismatch` when given."""
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens, num_seqs = max(batch.num_loss_tokens, 1.0), float(len(batch))
        metrics: dict[str, float] = defaultdict(float)
        for indices in self._micro_batches(batch):
            for key, value in self._micro_step(batch, indices, num_tokens, num_seqs, mismatch).items():
                metrics[key] += value
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else float("inf")
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.num_optimizer_steps += 1
        return dict(metrics)

    def _micro_step(self, batch: TrainBatch, indices: list[int], num_tokens: float, num_seqs: float,
                    mismatch: MismatchSums | None) -> dict[str, float]:
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
        if mismatch is not None and batch.rollout_log_probs is not None:
            mismatch.add(log_probs, pad(batch.rollout_log_probs), mask)
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


def mismatch_metrics(sums: MismatchSums) -> dict[str, float]:
    """`train/*` names (slime's where they exist) for the trainer-vs-rollout log-prob gap."""
    stats = sums.metrics()
    return {
        "train_rollout_logprob_abs_diff": stats["mean_abs_diff"],
        "train_rollout_logprob_max_abs_diff": stats["max_abs_diff"],
        "train_rollout_logprob_bitwise_equal": stats["bitwise_equal"],
        "train_rollout_kl": stats["kl_k3"],
    }
