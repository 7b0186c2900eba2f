"""`train.backend = "fsdp"`: the native trainer's math on N data-parallel ranks under FSDP2.

Every rank holds the whole rollout batch and runs the same methods (SPMD; on rank 0 the
`leader.py` proxy makes the other ranks follow the loop's calls). Each optimizer step's samples
are split across ranks balanced by tokens (`parallelize.split_by_tokens`); each rank builds its
micro-batches from its share with the native code and trains them with the native loss, whose
denominators are the counts of the whole step. FSDP sums the gradients over ranks, so the update
is the one-process update up to float summation order (`tests/train/test_fsdp.py`: loss and
grad norm within 1e-5 relative of `native`).

Mixed precision is FSDP's: fp32 sharded masters and AdamW state, parameters all-gathered in
`train.compute_dtype` for forward and backward, gradients reduced in fp32.

`train.fsdp_reshard = "step"` keeps the parameters gathered and accumulates the gradients
unsharded (fp32, FSDP's own accumulation) over an optimizer step's micro-batches, reducing them
once after the last backward. Why: the trainer's steps are host-bound on a GPU (many small
kernels a layer), and every gather, reshard and reduction is a per-layer hook on the host and, on
several ranks, a point where the ranks wait for each other; a step then costs one of each a layer.

The log-prob forward, lm_head included, runs inside one FSDP root module (`_ResponseLogProbs`),
so the root's parameters are unsharded wherever they are used. A rank with fewer micro-batches
than another runs zero-weight ones (a forward of one sample, loss x 0) so that every rank makes
the same collectives.

Checkpoints: the sharded model and optimizer go through torch DCP (`dcp/`, one file per rank,
readable on any number of ranks), the rest (schedule, step counts, reference model) in
`trainer_state.pt` from rank 0. Exported weights are full tensors with HF names, gathered on
every rank (a collective) in the same order.

Activation checkpointing applies to the sharded layers as to native ones (FSDP's hooks run
around each layer's checkpointed forward; its recomputation sees the weights gathered again for
backward). Not yet under FSDP (a clear error at start): PPO's critic, MoE routing replay, QAT and
`train.compile` (on CPU a compiled FSDP rank equals the compiled native trainer, but on an H200
its train step took 3.6x the eager one's time: `bench/results/multi_gpu_step.md` run 14).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from miles_core.algo import accumulate_metrics
from miles_core.algo.mismatch import MismatchSums
from miles_core.checkpoint.loading import DTYPES
from miles_core.config import AlgoConfig, TrainConfig
from miles_core.errors import MilesError
from miles_core.models.base import named_weights
from miles_core.train.batch import TrainBatch
from miles_core.train.native import NativeTrainer, _ResponseLogProbs, log_prob_forward
from miles_core.train.parallelize import apply_fsdp, broadcast_module, ensure_process_group, split_by_tokens
from miles_core.train.routing_replay import RoutingAgreement
from miles_core.train.speed import decoder_layers

STATE_FILE = "trainer_state.pt"
DCP_DIR = "dcp"


def check_fsdp_options(cfg: TrainConfig, algo: AlgoConfig) -> None:
    """One clear error for what the FSDP trainer does not do yet."""
    unsupported = {"algo.advantage_estimator = 'ppo' (critic)": algo.advantage_estimator == "ppo",
                   f"train.routing_replay = '{cfg.routing_replay}'": cfg.routing_replay != "off",
                   f"train.qat = '{cfg.qat}'": cfg.qat != "off", "train.compile": cfg.compile}
    for what, on in unsupported.items():
        if on:
            raise MilesError(f"train.backend = 'fsdp' does not support {what} yet; use train.backend = 'native'")


class _ShardedLogProbs(_ResponseLogProbs):
    """The FSDP root: returns copies, not views (FSDP hooks a module's outputs for its backward)."""

    def forward(self, tokens, response_lengths, routing):
        logps, entropies = super().forward(tokens, response_lengths, routing)
        return [t.clone() for t in logps], [t.clone() for t in entropies]


class FSDPTrainer(NativeTrainer):
    """`TrainBackend` whose every method is called on every rank with the same arguments."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, algo: AlgoConfig, *, temperature: float,
                 total_steps: int, reference: nn.Module | None = None) -> None:
        check_fsdp_options(cfg, algo)
        self._owns_group = ensure_process_group(next(model.parameters()).device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # Calls from rank 0 to the others (`leader.py`) travel on a gloo group of their own.
        self.control_group = dist.new_group(backend="gloo") if self.world_size > 1 else None
        model = model.to(torch.float32)
        broadcast_module(model)
        if reference is not None:
            broadcast_module(reference)
        self.wrapped = _ShardedLogProbs(model, log_prob_forward(cfg), temperature if temperature > 0 else 1.0,
                                         cfg.logprob_chunk_size)
        apply_fsdp(self.wrapped, list(decoder_layers(model)), DTYPES[cfg.compute_dtype])
        # FSDP casts to the compute dtype itself: the native path's own casts are off.
        super().__init__(model, dataclasses.replace(cfg, compute_dtype="float32"), algo, temperature=temperature,
                         total_steps=total_steps, reference=reference)
        self.compute_dtype = cfg.compute_dtype
        self._micro_batches_left = 0
        self._resharding = "fsdp"
        self._step_mismatch: tuple[MismatchSums, MismatchSums] | None = None

    def _forward(self, model: nn.Module, batch: TrainBatch, indices: list[int], routing=None):
        if model is not self.model:  # the reference: a full copy on every rank, no collectives
            return self._forward_in(DTYPES[self.compute_dtype], model, batch, indices, routing)  # as native's
        return self.wrapped([batch.tokens[i] for i in indices], [batch.response_lengths[i] for i in indices], None)

    def _shares(self, batch: TrainBatch) -> list[list[int]]:
        """Every rank's micro-batches (indices into `batch`) of its token-balanced share."""
        out = []
        for share in split_by_tokens(batch.tokens, batch.response_lengths, self.world_size,
                                     self.cfg.share_prompt_prefix):
            out.append([[share[j] for j in group] for group in self._micro_batches(batch.select(share))]
                       if share else [])
        return out

    def _step_micro_batches(self, batch: TrainBatch) -> list[list[int] | None]:
        """This rank's micro-batches, then None (a zero-weight one) up to the busiest rank's count."""
        shares = self._shares(batch)
        mine = shares[self.rank]
        planned = mine + [None] * (max(len(s) for s in shares) - len(mine))
        self._micro_batches_left = len(planned)
        return planned

    def _micro_step(self, batch: TrainBatch, indices: list[int] | None, *args) -> dict[str, float]:
        self._micro_batches_left -= 1
        if self.cfg.fsdp_reshard == "step":  # gathered until the last one's backward reduces and reshards
            self._set_resharding("last" if self._micro_batches_left == 0 else "hold")
        if indices is not None:
            return super()._micro_step(batch, indices, *args)
        logps, _ = self._forward(self.model, batch, [0])
        (logps[0].sum() * 0.0).backward()  # the collectives of a backward, no gradient
        return {}

    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch, *, reference: bool = False) -> list[torch.Tensor]:
        """Each rank computes its share's log-probs; every rank gets all of them."""
        model = self.reference if reference else self.model
        if model is None:
            raise ValueError("no reference model: enable algo.use_kl_loss or algo.kl_coef > 0 to keep one")
        mine: dict[int, torch.Tensor] = {}
        for indices in self._step_micro_batches(batch):
            logps, _ = self._forward(model, batch, indices if indices is not None else [0])
            if indices is not None:
                mine.update({i: logp.float().cpu() for i, logp in zip(indices, logps)})
        out: list[torch.Tensor | None] = [None] * len(batch)
        for part in _gather(mine):
            for i, logp in part.items():
                out[i] = logp
        if not reference:
            self._pass_metrics = {}
        return out

    def train_step(self, batch: TrainBatch, mismatch: MismatchSums | None = None,
                   agreement: RoutingAgreement | None = None, *, positions: list[int] | None = None) -> dict[str, float]:
        local = MismatchSums() if mismatch is not None else None
        self._step_mismatch = (local, mismatch) if mismatch is not None else None
        try:
            return super().train_step(batch, local, agreement, positions=positions)
        finally:
            if self.cfg.fsdp_reshard == "step":
                self._reshard_as_fsdp()  # nothing stays gathered between steps, nor after a failed one

    def _reshard_as_fsdp(self) -> None:
        """FSDP's own settings again, and every parameter resharded."""
        self._set_resharding("fsdp")
        for module in self.wrapped.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _set_resharding(self, setting: str) -> None:
        """`hold`: nothing resharded or reduced; `last`: resharded and reduced after backward;
        `fsdp`: FSDP's own (layers reshard after forward, the root does not: it is used first in
        backward). Each change walks every module, so only changes are made."""
        if setting == self._resharding:
            return
        self.wrapped.set_reshard_after_forward(setting == "fsdp")
        if setting == "fsdp":
            self.wrapped.set_reshard_after_forward(False, recurse=False)
        self.wrapped.set_reshard_after_backward(setting != "hold")
        self.wrapped.set_requires_gradient_sync(setting != "hold")
        self._resharding = setting

    def _reduce_step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Sum (min / max) the ranks' metrics; merge their mismatch sums and bad samples."""
        parts = _gather((metrics, self._step_mismatch[0] if self._step_mismatch else None, self._bad_samples))
        total: dict[str, float] = {}
        self._bad_samples = []
        for rank_metrics, sums, bad in parts:
            accumulate_metrics(total, rank_metrics)
            self._bad_samples += bad
            if self._step_mismatch is not None:
                self._step_mismatch[1].merge(sums)
        self._bad_samples.sort()
        return total

    def update_reference(self) -> None:
        if self.reference is None:
            raise ValueError("no reference model: enable algo.use_kl_loss or algo.kl_coef > 0 to keep one")
        self.reference.load_state_dict(dict(self.export_weights()), strict=False)

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors with HF names; a collective, so every rank must consume it whole."""
        for name, tensor in named_weights(self.model):
            yield name, tensor.full_tensor().detach() if isinstance(tensor, DTensor) else tensor.detach()

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        with self._optimizer_on_device():  # DCP saves the sharded (DTensor) state
            model_state, optim_state = get_state_dict(self.wrapped, self.optimizer)
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=directory / DCP_DIR)
        if self.rank == 0:
            with (directory / STATE_FILE).open("wb") as handle:
                torch.save(self._small_state(), handle)
        dist.barrier()

    def _small_state(self) -> dict:
        return {"format": "fsdp", "scheduler": self.scheduler.state_dict(),
                "num_optimizer_steps": self.num_optimizer_steps, "bad_steps_in_row": self.guard.in_row,
                "reference": self.reference.state_dict() if self.reference is not None else None}

    def load(self, directory: Path) -> None:
        if not (directory / DCP_DIR).is_dir():
            raise MilesError(f"'{directory}' holds no sharded (train.backend = 'fsdp') trainer state; resume it "
                             "with the backend that wrote it")
        self.reload_optimizer()
        model_state, optim_state = get_state_dict(self.wrapped, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=directory / DCP_DIR)
        set_state_dict(self.wrapped, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        small = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        self.scheduler.load_state_dict(small["scheduler"])
        self.num_optimizer_steps = small["num_optimizer_steps"]
        self.guard.in_row = small["bad_steps_in_row"]
        if self.reference is not None and small["reference"] is not None:
            self.reference.load_state_dict(small["reference"])

    def close(self) -> None:
        """Destroy the one-rank group this trainer started (a launcher's group is the launcher's):
        a live NCCL group's watchdog breaks later CUDA graph captures in the same process."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False


def _gather(obj) -> list:
    """`obj` of every rank, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
