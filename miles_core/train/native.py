"""The native PyTorch trainer: micro-batched policy-gradient steps on one device.

Weights and AdamW state are fp32. `compute_dtype = "bfloat16"` runs forward and backward on
bf16 copies of the weights (the cast is differentiable, so gradients reach the fp32 masters),
as FSDP's mixed precision does: activations are bf16 end to end exactly as in a bf16 inference
engine, which autocast would not give (it keeps the residual stream in fp32), so batch-invariant
kernels can make trainer and engine agree bit for bit. Losses use global token/sequence counts
as denominators, so summing micro-batch losses gives exactly the full-batch loss. Micro-batches
hold whole sequences, so per-row terms (sequence-level ratios, TIS weights) are exact too.

Old log-probs. With one optimizer step per rollout the "old" log-probs equal the current ones,
so they are taken (detached) from the training forward itself instead of a second pass. A no-grad
pass computes them first when something needs them before the update: several optimizer steps
per rollout, `algo.tis_batch_normalize` (the mean TIS weight of each optimizer step's rows), or
the KL reward of `algo.kl_coef` (the loop computes them with the advantages).

Optional models: a frozen `reference` (KL loss, KL reward; `update_reference` refreshes it) and
the PPO `critic` (`critic.py`), trained by the same backward through `policy_loss`'s value term.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from miles_core.algo import accumulate_metrics, tis_batch_mean
from miles_core.algo.losses import metric_floats, policy_loss_tensors
from miles_core.config import AlgoConfig, TrainConfig
from miles_core.errors import MilesError
from miles_core.algo.mismatch import MismatchSums
from miles_core.checkpoint.loading import DTYPES
from miles_core.utils.device import to_device
from miles_core.models.kept_weights import KeptWeights, WeightExport
from miles_core.quant.formats import QuantSpec
from miles_core.quant.fp8_train import apply_fp8_training
from miles_core.quant.qat import apply_int4_qat
from miles_core.train.batch import (TrainBatch, call_in_dtype, micro_batches, pad_ragged, response_log_probs,
                                   shared_prefix_log_probs, shared_prefix_micro_batches)
from miles_core.train.critic import Critic
from miles_core.train.finite import BadStepGuard, nonfinite_rows
from miles_core.train.offload import OptimizerOffloads
from miles_core.train.optim import build_optimizer, clip_grad_norm
from miles_core.train.packing import packed_log_probs, packed_micro_batches
from miles_core.train.speed import CastCache, apply_speed_options
from miles_core.train.routing_replay import RoutingAgreement, RoutingPlan, check_routed_shape, moe_shape

# policy_loss also reports this gap (old vs rollout log-probs, per micro-batch); the trainer's
# own measurement (`mismatch_metrics`, on the weights that generated the rollout) is the one logged.
_POLICY_LOSS_DUPLICATES = ("train_rollout_logprob_abs_diff",)


class _ResponseLogProbs(nn.Module):
    """Wraps the log-prob computation so `functional_call` can swap in cast weights for all of it
    (the lm_head weight is used outside the model's own forward)."""

    def __init__(self, model: nn.Module, forward: Callable, temperature: float, chunk_size: int) -> None:
        super().__init__()
        self.model, self.fn, self.temperature, self.chunk_size = model, forward, temperature, chunk_size

    def forward(self, tokens, response_lengths, routing):
        return self.fn(self.model, tokens, response_lengths, temperature=self.temperature,
                       chunk_size=self.chunk_size, routing=routing)


class NativeTrainer:
    """`TrainBackend` for a native model in this process."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, algo: AlgoConfig, *, temperature: float,
                 total_steps: int, reference: nn.Module | None = None, critic: Critic | None = None) -> None:
        self.model, self.cfg, self.algo = model.train(), cfg, algo
        self.reference, self.critic = reference, critic
        self.temperature = temperature if temperature > 0 else 1.0
        self.optimizer, self.scheduler = build_optimizer(model.parameters(), cfg, total_steps)
        self._offloads = OptimizerOffloads([o for o in (self.optimizer, critic.optimizer if critic else None) if o])
        self.device = next(model.parameters()).device
        self.num_optimizer_steps = 0
        self._pass_metrics: dict[str, float] = {}
        self.guard = BadStepGuard(cfg.max_bad_steps)
        self._bad_samples: list[int] = []
        self._positions: list[int] = []
        self._casts = CastCache()  # the policy's compute-dtype weights, cast once per optimizer step
        self._export = WeightExport(model)
        self.qat_modules = _apply_qat(model, cfg)
        self.fp8_modules = apply_fp8_training(model) if cfg.precision == "fp8" else []
        apply_speed_options(model, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile)

    def _forward(self, model: nn.Module, batch: TrainBatch, indices: list[int], routing: RoutingPlan | None = None):
        return self._forward_in(DTYPES[self.cfg.compute_dtype], model, batch, indices, routing)

    def _forward_in(self, dtype: torch.dtype, model: nn.Module, batch: TrainBatch, indices: list[int],
                    routing: RoutingPlan | None):
        """Response log-probs and entropies of `indices`, every parameter cast to `dtype` for the call."""
        module = _ResponseLogProbs(model, log_prob_forward(self.cfg), self.temperature, self.cfg.logprob_chunk_size)
        args = ([batch.tokens[i] for i in indices], [batch.response_lengths[i] for i in indices], routing)
        return call_in_dtype(module, args, dtype, self._casts if model is self.model else None)

    def _routing_plan(self, batch: TrainBatch, indices: list[int]) -> RoutingPlan | None:
        """What the policy's MoE layers use in this forward (None for dense models)."""
        layers, topk = self._moe_shape()
        if not layers:
            return None
        replay = None
        if self.cfg.routing_replay == "rollout":
            if batch.routed_experts is None:
                raise MilesError("train.routing_replay = 'rollout' needs the engine's routed experts in every "
                                 "sample (set engine.return_routed_experts = true)")
            replay = [batch.routed_experts[i] for i in indices]
        elif self.cfg.routing_replay == "record" and batch.trainer_routed_experts is not None:
            replay = [batch.trainer_routed_experts[i] for i in indices]
        for i, routed in zip(indices, replay or []):
            check_routed_shape(routed, len(batch.tokens[i]), layers, topk, f"sample {i}")
        return RoutingPlan(layers, topk, replay)

    def _moe_shape(self) -> tuple[int, int]:
        """(MoE layers, top-k) of the policy; (0, 0) for a dense model."""
        return moe_shape(self.model)

    def _measure_routing(self, batch: TrainBatch, indices: list[int], plan: RoutingPlan | None,
                         agreement: RoutingAgreement | None) -> None:
        if plan is None or agreement is None or batch.routed_experts is None:
            return
        for i, recorded in zip(indices, plan.recorded):
            check_routed_shape(batch.routed_experts[i], len(batch.tokens[i]), plan.layers, plan.topk, f"sample {i}")
            agreement.add(recorded, batch.routed_experts[i])

    def _micro_batches(self, batch: TrainBatch) -> list[list[int]]:
        budget, cap = self.cfg.max_tokens_per_micro_batch, self.cfg.micro_batch_size
        if self.cfg.pack_sequences:
            return packed_micro_batches(batch.tokens, batch.response_lengths, budget, self.cfg.share_prompt_prefix, cap)
        if self.cfg.share_prompt_prefix:
            return shared_prefix_micro_batches(batch.tokens, batch.response_lengths, budget, cap)
        return micro_batches([len(t) for t in batch.tokens], budget, cap)

    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch, *, reference: bool = False) -> list[torch.Tensor]:
        """Per-sample log-probs (no grad). The policy pass keeps its own MoE routing in
        `batch.trainer_routed_experts` for `routing_replay = "record"`; the reference routes itself.
        A policy pass over samples with the engine's routing measures `routing_agreement`
        (`last_pass_metrics`)."""
        model = self.reference if reference else self.model
        if model is None:
            raise ValueError("no reference model: enable algo.use_kl_loss or algo.kl_coef > 0 to keep one")
        agreement = RoutingAgreement()
        out: list[torch.Tensor | None] = [None] * len(batch)
        recorded: list = [None] * len(batch)
        for indices in self._micro_batches(batch):
            plan = None if reference else self._routing_plan(batch, indices)
            logps, _ = self._forward(model, batch, indices, plan)
            self._measure_routing(batch, indices, plan, agreement)
            for j, (i, logp) in enumerate(zip(indices, logps)):
                out[i] = logp.float().cpu()
                recorded[i] = plan.recorded[j] if plan else None
        if not reference and self.cfg.routing_replay == "record" and self._moe_shape()[0]:
            batch.trainer_routed_experts = recorded
        if not reference:
            self._pass_metrics = {"routing_agreement": agreement.fraction} if agreement.total else {}
        return out

    def skipped_notes(self) -> list[str]:
        """One line per optimizer step of the last `train_rollout` that was skipped (non-finite
        loss or gradient norm): the values and the offending samples."""
        return list(self.guard.notes)

    def last_pass_metrics(self) -> dict[str, float]:
        """`routing_agreement` of the last policy `compute_log_probs` pass (MoE with the engine's
        routing in the samples); empty otherwise."""
        return dict(self._pass_metrics)

    def compute_values(self, batch: TrainBatch) -> list[torch.Tensor]:
        """The critic's per-token values of the current weights (no grad): PPO's old values."""
        if self.critic is None:
            raise ValueError("no critic: advantage_estimator 'ppo' keeps one")
        return self.critic.compute_values(batch, self._micro_batches(batch))

    def update_reference(self) -> None:
        """Copy the policy's weights into the reference model (`algo.ref_update_interval`)."""
        if self.reference is None:
            raise ValueError("no reference model: enable algo.use_kl_loss or algo.kl_coef > 0 to keep one")
        self.reference.load_state_dict(self.model.state_dict())

    def train_rollout(self, batch: TrainBatch) -> dict[str, float]:
        """All optimizer steps of one rollout: the rows are split evenly between them."""
        if batch.advantages is None:
            raise ValueError("train_rollout needs batch.advantages (estimate them first)")
        self._offloads.reload(overlap=True)  # if a colocated loop offloaded it: copied while the passes run
        self._fill_missing_inputs(batch)
        # Train/rollout mismatch is measured on the weights that generated the rollout: the old
        # log-probs when computed, else the first (only) optimizer step's own forward.
        mismatch = MismatchSums()
        if batch.old_log_probs is not None and batch.rollout_log_probs is not None:
            for old, rollout, mask in zip(batch.old_log_probs, batch.rollout_log_probs, batch.loss_masks):
                mismatch.add(old, rollout, mask)
        splits = [s for s in torch.arange(len(batch)).tensor_split(self.cfg.num_steps_per_rollout) if len(s)]
        measure = mismatch if batch.old_log_probs is None else None
        # MoE routing agreement: the first step's forward runs on the rollout's weights.
        agreement = RoutingAgreement()
        self.guard.notes = []
        per_step = [self.train_step(batch.select(indices.tolist()), measure, agreement if k == 0 else None,
                                    positions=indices.tolist()) for k, indices in enumerate(splits)]
        totals = mean_over_steps(per_step)
        if batch.rollout_log_probs is not None:
            totals.update(mismatch_metrics(mismatch))
        if agreement.total:
            totals["routing_agreement"] = agreement.fraction
        return totals

    def _fill_missing_inputs(self, batch: TrainBatch) -> None:
        """No-grad passes for what the update needs and the caller did not provide."""
        if self.algo.use_kl_loss and batch.ref_log_probs is None:
            batch.ref_log_probs = self.compute_log_probs(batch, reference=True)
        need_old = self.cfg.num_steps_per_rollout > 1 or self.algo.tis_batch_normalize
        if need_old and batch.old_log_probs is None:
            batch.old_log_probs = self.compute_log_probs(batch)
        if self.critic is not None and (batch.values is None or batch.returns is None):
            raise ValueError("the critic trains on batch.values and batch.returns (estimate the PPO advantages first)")

    def train_step(self, batch: TrainBatch, mismatch: MismatchSums | None = None,
                   agreement: RoutingAgreement | None = None, *, positions: list[int] | None = None) -> dict[str, float]:
        """One optimizer step over `batch`, accumulated over micro-batches; the forward's log-probs
        are compared with the rollout's into `mismatch` when given. A non-finite loss or gradient
        norm skips the step (`skipped_step` = 1; `positions`, the rows' places in the rollout,
        name the offending samples in `skipped_notes()`)."""
        self._positions, self._bad_samples = positions or list(range(len(batch))), []
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic is not None:
            self.critic.zero_grad()
        num_tokens, num_seqs = max(batch.num_loss_tokens, 1.0), float(len(batch))
        tis_mean = self._tis_batch_mean(batch)
        metrics: dict[str, float] = {}
        for indices in self._step_micro_batches(batch):
            accumulate_metrics(metrics, self._micro_step(batch, indices, num_tokens, num_seqs, tis_mean, mismatch,
                                                         agreement))
        metrics = self._reduce_step_metrics(metrics)
        metrics["grad_norm"] = self._clip_grads()
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if tis_mean is not None:
            metrics["tis_batch_mean"] = tis_mean
        metrics["skipped_step"] = float(self.guard.should_skip(metrics.get("loss", 0.0), metrics["grad_norm"],
                                                               self._bad_samples))
        if metrics["skipped_step"]:
            self.optimizer.zero_grad(set_to_none=True)  # nothing of this batch may reach the weights
            if self.critic is not None:
                self.critic.zero_grad()
            return metrics
        self._offloads.wait_reloaded()  # on the GPU: an overlapped reload's copies come first
        self.optimizer.step()
        self.scheduler.step()
        if self.critic is not None:
            metrics["value_grad_norm"] = self.critic.step()
        self.num_optimizer_steps += 1
        return metrics

    def _clip_grads(self) -> float:
        """The policy's gradient clipped to `train.clip_grad`; its norm before (model-parallel: reduced)."""
        return clip_grad_norm(self.model.parameters(), self.cfg)

    def _step_micro_batches(self, batch: TrainBatch) -> list[list[int]]:
        """The micro-batches this process trains of an optimizer step's `batch` (data-parallel
        trainers take their share here)."""
        return self._micro_batches(batch)

    def _reduce_step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """An optimizer step's summed micro-batch metrics over every process (one here)."""
        return metrics

    def _tis_batch_mean(self, batch: TrainBatch) -> float | None:
        """The mean TIS weight over this optimizer step's rows (`algo.tis_batch_normalize`)."""
        if not self.algo.tis_batch_normalize:
            return None
        if batch.old_log_probs is None or batch.rollout_log_probs is None:
            raise ValueError("tis_batch_normalize needs the old and the rollout log-probs of the batch")
        return tis_batch_mean(self.algo, old_log_probs=pad_ragged(batch.old_log_probs),
                              rollout_log_probs=pad_ragged(batch.rollout_log_probs),
                              loss_mask=pad_ragged(batch.loss_masks))

    def _micro_step(self, batch: TrainBatch, indices: list[int], num_tokens: float, num_seqs: float,
                    tis_mean: float | None, mismatch: MismatchSums | None,
                    agreement: RoutingAgreement | None) -> dict[str, float]:
        plan = self._routing_plan(batch, indices)
        logps, entropies = self._forward(self.model, batch, indices, plan)
        self._measure_routing(batch, indices, plan, agreement)

        def pad(values: list[torch.Tensor] | None) -> torch.Tensor | None:
            return None if values is None else to_device(pad_ragged([values[i] for i in indices]), self.device)

        log_probs, mask = pad_ragged(logps).float(), pad(batch.loss_masks)
        old = pad(batch.old_log_probs) if batch.old_log_probs is not None else log_probs.detach()
        values = self.critic.values(batch, indices).to(self.device) if self.critic is not None else None
        loss, metric_tensors = policy_loss_tensors(
            self.algo, log_probs=log_probs, old_log_probs=old, advantages=pad(batch.advantages),
            loss_mask=mask, num_tokens=num_tokens, num_seqs=num_seqs, entropy=pad_ragged(entropies).float(),
            ref_log_probs=pad(batch.ref_log_probs), rollout_log_probs=pad(batch.rollout_log_probs),
            tis_batch_mean=tis_mean, values=values, old_values=pad(batch.values) if values is not None else None,
            returns=pad(batch.returns) if values is not None else None,
        )
        loss.backward()
        self._casts.fold_grads()
        metrics = metric_floats(metric_tensors)  # read after backward was queued: no stall between them
        if not math.isfinite(metrics.get("loss", 0.0)):
            self._bad_samples += nonfinite_rows([self._positions[i] for i in indices], mask, log_probs.detach(),
                                                pad(batch.advantages))
        if mismatch is not None and batch.rollout_log_probs is not None:
            mismatch.add(log_probs, pad(batch.rollout_log_probs), mask)
        return {k: v for k, v in metrics.items() if k not in _POLICY_LOSS_DUPLICATES}

    def export_weights(self) -> KeptWeights:
        """The same tuple push after push while the parameters stay in place (`kept_weights.py`)."""
        return self._export.current()

    def offload_optimizer(self) -> int:
        """Move the optimizer state (the critic's too) to host memory while a colocated engine
        generates (`offload.py`); returns the bytes moved off the GPU (0 on CPU)."""
        return self._offloads.offload()

    def reload_optimizer(self) -> None:
        """Put the optimizer state back on its device, bitwise (no-op unless offloaded)."""
        self._offloads.reload()

    def _optimizer_on_device(self):
        """Checkpoints hold the state as it is on its device, offloaded or not."""
        return self._offloads.on_device()

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # Through a Python file: a full disk is an OSError naming the file, not torch's RuntimeError.
        with (directory / "trainer_state.pt").open("wb") as handle, self._optimizer_on_device():
            self._save_to(handle)

    def _save_to(self, handle) -> None:
        torch.save({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "num_optimizer_steps": self.num_optimizer_steps,
            "reference": self.reference.state_dict() if self.reference is not None else None,
            "critic": self.critic.state_dict() if self.critic is not None else None,
            "bad_steps_in_row": self.guard.in_row,
        }, handle)

    def load(self, directory: Path) -> None:
        self.reload_optimizer()  # the loaded state replaces it on its device
        state = torch.load(directory / "trainer_state.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.num_optimizer_steps = state["num_optimizer_steps"]
        self.guard.in_row = state.get("bad_steps_in_row", 0)
        if self.reference is not None and state.get("reference") is not None:
            self.reference.load_state_dict(state["reference"])
        if self.critic is not None and state.get("critic") is not None:
            self.critic.load_state_dict(state["critic"])


def log_prob_forward(cfg: TrainConfig) -> Callable:
    """The forward `train.pack_sequences` and `train.share_prompt_prefix` choose."""
    if cfg.pack_sequences:
        return functools.partial(packed_log_probs, share_prompt_prefix=cfg.share_prompt_prefix)
    return shared_prefix_log_probs if cfg.share_prompt_prefix else response_log_probs


def _apply_qat(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """`train.qat`: fake-quantise the chosen modules' weights in every forward (`quant/qat.py`)."""
    if cfg.qat == "off":
        return []
    try:
        return apply_int4_qat(model, QuantSpec("int4", cfg.qat_group_size, include=cfg.qat_modules))
    except ValueError as err:
        raise MilesError(str(err)) from None


def mean_over_steps(per_step: list[dict[str, float]]) -> dict[str, float]:
    """One record for a rollout's optimizer steps: the mean, except `*_min` / `*_max` (min / max)."""
    out: dict[str, float] = {}
    for key in sorted({k for m in per_step for k in m}):
        values = [m[key] for m in per_step if key in m]
        if key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = math.fsum(values) / len(values)
    return out


def mismatch_metrics(sums: MismatchSums) -> dict[str, float]:
    """`train/*` names (slime's where they exist) for the trainer-vs-rollout log-prob gap."""
    stats = sums.metrics()
    return {
        "train_rollout_logprob_abs_diff": stats["mean_abs_diff"],
        "train_rollout_logprob_max_abs_diff": stats["max_abs_diff"],
        "train_rollout_logprob_bitwise_equal": stats["bitwise_equal"],
        "train_rollout_kl": stats["kl_k3"],
    }
