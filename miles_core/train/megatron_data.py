"""Data parallelism beside megatron-core's tensor, context or expert parallelism (`train.backend =
"megatron"`): `miles train --nproc-per-node N` with M = TP x CP x EP ranks per model replica
runs DP = N / M replicas (with PP stages M = TP x CP x EP x PP, each stage's ranks forming their
own data-parallel group). DP is implicit, what the world size leaves, as in megatron, except that
under EP a replica's EP ranks share its samples (megatron gives each EP rank samples of its own):
the samples split over N / EP replicas, not N.

Layout: megatron-core's rank order (tp-cp-ep-dp-pp) puts the M ranks of a replica next to each
other: replica r is ranks r*M .. r*M + M - 1. This rank's replica is its rank in megatron's
expert-data-parallel group (the ranks that hold the same experts, or under dense TP the same
shard; divided by CP, whose ranks that group spans too); the replica's first rank (TP, CP and EP
rank 0) of its last pipeline stage reports for it.

Work split (`share`): each optimizer step's samples are split across the replicas balanced by
tokens (`parallelize.split_by_tokens`, the FSDP backend's split), and every rank of a replica
takes its replica's share, so the TP (EP, CP) ranks of one replica still run the same
micro-batches (each CP rank its chunks of them). The losses keep the whole step's token and sequence counts as denominators, so the sum of the
replicas' gradients is the one-replica gradient of the whole step. No collective crosses replicas
in a forward or backward (the TP all-reduces and the MoE dispatcher's all-gathers stay inside a
replica), so a replica with fewer micro-batches simply runs fewer: FSDP's zero-weight padding is
not needed here.

Gradients (`reduce_grads`, after `megatron_shards.reduce_grads` completed the TP shards):
summed in flattened buckets over megatron's data-parallel group with context parallelism (a CP
rank's gradient is its tokens' part of its replica's: `megatron_context.py`), and the parameters
megatron marks as expert-parallel (`allreduce = False`) over its expert-data-parallel group; then divided
by EP, because under EP every rank of a replica feeds the same tokens: the dense copies' sum
counts each replica EP times and each expert saw EP copies of its replica's tokens (EP a power of
two: exact). Under CP with EP each CP rank routes its own chunks and its EP group's dispatcher
gathers them, so an expert's gradient on one rank is only some tokens' part; the expert-data-
parallel group holds every rank with that expert (CP ranks included: megatron's expert layout
folds CP into it), so its sum covers every token of every CP rank, EP times as for the dense
parameters. A parameter with a gradient on some ranks of a group only (a replica given no
samples) takes zeros on the others; one with none anywhere keeps none, so AdamW skips it as on
one rank. All-reduce leaves every copy bitwise equal, so the gradient norm
(`megatron_shards.grad_norm`: megatron marks the DP copies as non-main replicas, each element
counts once) and the clipping are the same on every rank.

Results (`DataParallelSteps`): log-prob passes return every sample's log-probs (and recorded MoE
routing) in the batch's order on every rank; a step's metrics, mismatch sums, routing agreement
and non-finite samples are combined from the replicas' first ranks, so rank 0 reports the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from miles_core.algo import accumulate_metrics
from miles_core.algo.mismatch import MismatchSums
from miles_core.train.batch import TrainBatch
from miles_core.train.parallelize import split_by_tokens
from miles_core.train.routing_replay import RoutingAgreement

BUCKET_BYTES = 1 << 27
"""Gradient bytes per all-reduce (128 MiB): few calls, a bounded extra copy."""


@dataclass(frozen=True)
class Replicas:
    """This rank's place among the data-parallel replicas of the model."""

    size: int = 1
    index: int = 0
    leader: bool = True
    """Whether this rank reports for its replica (its first rank; of the last pipeline stage)."""
    gather: bool = False
    """Whether results come from other ranks: DP > 1 replicas, or pipeline stages (the last one's)."""


def replicas() -> Replicas:
    """From megatron-core's parallel state (see the module docstring)."""
    from megatron.core import parallel_state as ps

    # The expert-data-parallel group spans the CP ranks too (megatron's expert layout has no CP
    # dimension: world / (TP x EP x PP) ranks), a replica's CP ranks consecutive in it: they hold
    # parts of the same samples, not samples of their own.
    cp = ps.get_context_parallel_world_size()
    size = ps.get_expert_data_parallel_world_size() // cp
    stages = ps.get_pipeline_model_parallel_world_size()
    leader = ps.get_tensor_model_parallel_rank() == 0 and ps.get_expert_model_parallel_rank() == 0 \
        and ps.get_context_parallel_rank() == 0 and ps.is_pipeline_last_stage()
    return Replicas(size, ps.get_expert_data_parallel_rank() // cp, leader, size > 1 or stages > 1)


def share(batch: TrainBatch, dp: Replicas, micro_batches: Callable[[TrainBatch], list[list[int]]]) -> list[list[int]]:
    """This replica's micro-batches (indices into `batch`) of its token-balanced share."""
    mine = split_by_tokens(batch.tokens, batch.response_lengths, dp.size, False)[dp.index]
    return [[mine[j] for j in group] for group in micro_batches(batch.select(mine))] if mine else []


def gather_replicas(obj, dp: Replicas, group) -> list:
    """`obj` of each replica's first rank, in replica order, on every rank (a collective)."""
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, (dp.leader, obj), group=group)
    return [part for leader, part in every if leader]


def reduction_groups(params: list[nn.Parameter]) -> list[tuple[list[nn.Parameter], object]]:
    """(parameters, the group their gradients are summed over), for the non-empty ones: the dense
    parameters over megatron's data-parallel group with context parallelism (under CP each rank's
    gradient is its tokens' part: the sum over the CP ranks is the whole), the experts megatron
    marks `allreduce = False` over its expert-data-parallel group. `reduce_grads` and the ZeRO
    optimizer share it."""
    from megatron.core import parallel_state as ps

    experts = [p for p in params if getattr(p, "allreduce", True) is False]  # megatron's own mark
    dense = [p for p in params if getattr(p, "allreduce", True) is not False]
    return [(group_params, group) for group_params, group in
            ((dense, ps.get_data_parallel_group(with_context_parallel=True)),
             (experts, ps.get_expert_data_parallel_group())) if group_params]


def reduce_grads(model: nn.Module, ep_size: int) -> None:
    """Sum the gradients over the replicas (and EP copies), then divide by EP (module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for group_params, group in reduction_groups(params):
        if dist.get_world_size(group) > 1:
            all_reduce_grads(group_params, group)
    if ep_size > 1:
        for p in params:
            if p.grad is not None:
                p.grad.div_(ep_size)


def all_reduce_grads(params: list[nn.Parameter], group) -> None:
    """Sum `params`' gradients over `group` in flattened buckets; every rank of `group` passes the
    same parameters in the same order. Zeros stand in where a rank has no gradient and another has."""
    present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX, group=group)
    grads = []
    for p, used in zip(params, present.tolist()):
        if used and p.grad is None:
            p.grad = torch.zeros_like(p)
        if used:
            grads.append(p.grad)
    for bucket in _buckets(grads):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(reduced)


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive tensors of one dtype, up to `BUCKET_BYTES` each (a larger tensor alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.dtype.itemsize
        if not out or out[-1][0].dtype != t.dtype or size + nbytes > BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out


class DataParallelSteps:
    """The `NativeTrainer` hooks that a megatron trainer with DP > 1 replicas overrides; at DP = 1
    each one is the native trainer's. Needs `self.dp` (`Replicas`) and `self.control_group`."""

    dp: Replicas

    def _step_micro_batches(self, batch: TrainBatch) -> list[list[int]]:
        if not self.dp.gather:
            return super()._step_micro_batches(batch)
        return share(batch, self.dp, self._micro_batches)

    def train_step(self, batch: TrainBatch, mismatch: MismatchSums | None = None,
                   agreement: RoutingAgreement | None = None, *,
                   positions: list[int] | None = None) -> dict[str, float]:
        """This replica's share measures into sums of its own, merged into the caller's
        `mismatch` and `agreement` by `_reduce_step_metrics`."""
        if not self.dp.gather:
            return super().train_step(batch, mismatch, agreement, positions=positions)
        self._step_sums = (mismatch, agreement)
        self._local_sums = (MismatchSums() if mismatch is not None else None,
                            RoutingAgreement() if agreement is not None else None)
        return super().train_step(batch, *self._local_sums, positions=positions)

    def _reduce_step_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Sum (min / max) the replicas' metrics; merge their mismatch, agreement and bad samples."""
        if not self.dp.gather:
            return super()._reduce_step_metrics(metrics)
        local_mismatch, local_agreement = self._local_sums
        parts = gather_replicas((metrics, _settled(local_mismatch), local_agreement, self._bad_samples), self.dp,
                                self.control_group)
        mismatch, agreement = self._step_sums
        total: dict[str, float] = {}
        bad: list[int] = []
        for part_metrics, part_mismatch, part_agreement, part_bad in parts:
            accumulate_metrics(total, part_metrics)
            bad += part_bad
            if mismatch is not None:
                mismatch.merge(part_mismatch)
            if agreement is not None:
                _add_agreement(agreement, part_agreement)
        self._bad_samples = sorted(bad)
        return total

    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch, *, reference: bool = False) -> list[torch.Tensor]:
        """Each replica computes its share; every rank gets all of them in the batch's order."""
        if not self.dp.gather:
            return super().compute_log_probs(batch, reference=reference)
        model = self.reference if reference else self.model
        if model is None:
            raise ValueError("no reference model: enable algo.use_kl_loss or algo.kl_coef > 0 to keep one")
        agreement, mine = RoutingAgreement(), {}
        for indices in self._step_micro_batches(batch):
            plan = None if reference else self._routing_plan(batch, indices)
            logps, _ = self._forward(model, batch, indices, plan)
            self._measure_routing(batch, indices, plan, agreement)
            for j, (i, logp) in enumerate(zip(indices, logps)):
                # an earlier pipeline stage keeps no records (the last stage reports them)
                mine[i] = (logp.float().cpu(), plan.recorded[j] if plan and plan.recorded else None)
        out: list = [None] * len(batch)
        recorded: list = [None] * len(batch)
        total = RoutingAgreement()
        for part, part_agreement in gather_replicas((mine, agreement), self.dp, self.control_group):
            for i, (logp, routed) in part.items():
                out[i], recorded[i] = logp, routed
            _add_agreement(total, part_agreement)
        if not reference and self.cfg.routing_replay == "record" and self._moe_shape()[0]:
            batch.trainer_routed_experts = recorded
        if not reference:
            self._pass_metrics = {"routing_agreement": total.fraction} if total.total else {}
        return out


def _settled(sums: MismatchSums | None) -> MismatchSums | None:
    """`sums` as plain numbers (no pending device tensors) to send to the other ranks."""
    if sums is None:
        return None
    out = MismatchSums()
    out.merge(sums)
    return out


def _add_agreement(total: RoutingAgreement, part: RoutingAgreement) -> None:
    total.equal += part.equal
    total.total += part.total
