"""Pipeline stages of the megatron trainer (`train.pipeline_model_parallel_size` = PP, slime's
`--pipeline-model-parallel-size`; every family): each stage is a megatron-core `GPTModel` built
with its own layers (`megatron_model.build_gpt`: the first stage holds the embedding, the last the
final norm and the output layer), activations and their gradients sent between stages with
`torch.distributed` point-to-point calls on the default group.

Layout: megatron-core's rank order (tp-cp-ep-dp-pp) makes the stage the outermost index: stage s
is ranks s*M .. s*M + M - 1 of the world's M = TP x CP x EP x DP ranks per stage. A rank sends to the
rank of the same TP, CP, EP and DP place in the next stage (megatron's
`get_pipeline_model_parallel_next_rank`), so tensor, context, expert and data parallelism
(`megatron_data.py`) run inside each stage unchanged; under sequence parallelism each TP rank
sends its 1/TP of the (padded) sequence, under EP each EP rank its copy of the same activations,
under context parallelism each CP rank its two chunks of every sequence (T / CP rows,
`megatron_context.py`): every stage splits the sequence the same way, the last one gathers the
log-probs over its CP ranks, and each stage's gradients are summed over its own CP ranks (its
data-parallel group with CP).

Schedule: one micro-batch in flight. For each micro-batch the first stage runs its layers on the
token ids and sends the (T, B, E) hidden states on; each later stage receives them, runs its
layers and sends on; the last stage applies the final norm, our chunked (or vocab-parallel)
log-prob kernel and the `algo/` loss with the whole step's denominators (the native trainer's
`_micro_step`, unchanged), runs the backward and sends the gradient of its input back; each
earlier stage receives the gradient of its output, runs its backward and sends on. Every
optimizer step is the one-rank step: the same micro-batches, the same sums. Cost: only one
stage computes at any time, so each stage idles (PP - 1) / PP of the step (the bubble that
GPipe's and 1F1B's overlapping of micro-batches shrink; neither is written here), in exchange
for holding one micro-batch's activations and 1 / PP of the layers. Log-prob passes run the same
way without the backward.

MoE routing (R3 replay, records for `routing_agreement` and `routing_replay = "record"`): every
stage builds the same `RoutingPlan` (all MoE layers' replay ids of the micro-batch's samples) and
replays and records its own MoE layers, numbered globally (`megatron_routing.RoutingHooks`: a
stage's MoE layers are a contiguous run, dense layers not counted). The records travel with the
activations: a stage receives the earlier stages' records (per sample (len - 1, their MoE layers,
K), concatenated over the samples) right after their hidden states, puts its own behind them and
sends the lot on, so the last stage holds every layer's records in the global layer order and
measures agreement as one rank does. No auxiliary load-balancing loss crosses the stages: the
MoE configs switch megatron's off (`moe_router_load_balancing_type = "none"`, coefficient 0), as
the native trainer adds none.

Results: only the last stage has log-probs and loss metrics; `megatron_data.DataParallelSteps`
gathers them from the replicas' reporting ranks, which under PP are the last stage's first
ranks (`megatron_data.replicas`), so rank 0 (first stage) reports the step and returns every
sample's log-probs in the batch's order. Earlier stages return empty tensors in place of
log-probs, which that gather drops.

Gradients: each stage's parameters are its own, so the gradient norm (`megatron_shards.grad_norm`,
summed over the world) counts each once. Tied embeddings (`tie_word_embeddings`) live on both ends
(the last stage's output layer is megatron's copy of the embedding, a non-main replica): their
gradients are summed over megatron's embedding group (`reduce_embedding_grads`, megatron's
`_allreduce_embedding_grads`), so both copies take the same update and the norm counts the first
stage's. The distributed optimizer (`megatron_zero.py`) shards each stage's parameters over that
stage's data-parallel ranks, after the tied copies' sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from miles_core.checkpoint.loading import DTYPES
from miles_core.train.batch import TrainBatch, call_in_dtype, pad_ragged
from miles_core.train.megatron_context import ContextSplit, split_inputs
from miles_core.train.megatron_data import all_reduce_grads
from miles_core.train.megatron_routing import RoutingHooks
from miles_core.train.routing_replay import RoutingPlan


@dataclass(frozen=True)
class Stages:
    """This rank's place in its pipeline."""

    size: int = 1
    rank: int = 0
    prev: int = -1
    """Global rank of the previous stage's peer (-1 on the first stage)."""
    next: int = -1
    """Global rank of the next stage's peer (-1 on the last stage)."""

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1


def stages() -> Stages:
    """From megatron-core's parallel state."""
    from megatron.core import parallel_state as ps

    size, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    if size == 1:
        return Stages()
    return Stages(size, rank, ps.get_pipeline_model_parallel_prev_rank() if rank > 0 else -1,
                  ps.get_pipeline_model_parallel_next_rank() if rank < size - 1 else -1)


def reduce_embedding_grads(model: nn.Module, pp: Stages) -> None:
    """Sum the tied embedding's gradient over its first-stage and last-stage copies (module docstring)."""
    from megatron.core import parallel_state as ps

    if pp.size == 1 or not model.share_embeddings_and_output_weights or not (pp.first or pp.last):
        return
    all_reduce_grads([model.shared_embedding_or_output_weight()], ps.get_embedding_group())


def sequence_multiple(model: nn.Module) -> int:
    """What the padded sequence length must divide by: TP under sequence parallelism (megatron
    splits the sequence over the TP ranks between its split layers), else 1."""
    config = model.config
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def context_multiple(split: ContextSplit) -> int:
    """2 x CP under context parallelism (each CP rank holds two of 2 x CP equal chunks), else 1."""
    return 2 * split.size if split.size > 1 else 1


def padded_length(tokens: list[torch.Tensor], multiple: int) -> int:
    longest = max(len(t) for t in tokens)
    return -(-longest // multiple) * multiple


def stage_inputs(tokens: list[torch.Tensor], device: torch.device, multiple: int = 1) -> tuple[torch.Tensor, ...]:
    """Right-padded (B, T) ids, their positions and the causal mask (True: masked), as megatron-core's
    `GPTModel` takes them; T a multiple of `multiple` (sequence parallelism splits T over the TP ranks)."""
    ragged_BT = pad_ragged(tokens)
    ids_BT = torch.nn.functional.pad(ragged_BT, (0, padded_length(tokens, multiple) - ragged_BT.shape[1])).to(device)
    B, T = ids_BT.shape
    positions_BT = torch.arange(T, device=device)[None, :].expand(B, T)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=device), diagonal=1)[None, None]
    return ids_BT, positions_BT, causal


def run_layers(model: nn.Module, tokens: list[torch.Tensor], hooks: RoutingHooks,
               routing: RoutingPlan | None = None,
               split: ContextSplit = ContextSplit()) -> tuple[torch.Tensor, torch.Tensor]:
    """This stage's forward over the right-padded `tokens`: its (T, B, E) output (megatron's layout;
    under context parallelism (`split`) this rank's two chunks of T) and the whole (B, T) ids;
    `routing` (MoE) replays and/or records this stage's MoE layers through the router `hooks`,
    leaving per sample (len - 1, this stage's MoE layers, K) in `routing.recorded`."""
    device = next(model.parameters()).device
    multiple = sequence_multiple(model) * context_multiple(split)
    ids_BT, positions_BT, mask = stage_inputs(tokens, device, multiple)
    B, T = ids_BT.shape
    local_BT = ids_BT
    if split.size > 1:  # this rank's two chunks of every sequence (`megatron_context.py`)
        local_BT, positions_BT, mask = split_inputs(ids_BT, split)
    ctx = hooks.context(routing, [(b, 0, len(t) - 1) for b, t in enumerate(tokens)], T, device) if routing else None
    with hooks.active(ctx, B, T):
        hidden_TBE = model(local_BT, positions_BT, attention_mask=mask)
    if routing:
        ids_BTLK = hooks.stacked(ctx, B, T)
        routing.recorded = [ids_BTLK[b, : len(t) - 1] for b, t in enumerate(tokens)]
    return hidden_TBE, ids_BT


class _StageForward(nn.Module):
    """A stage before the last: its layers' (T, B, E) output; one module so `call_in_dtype` casts it."""

    def __init__(self, model: nn.Module, hooks: RoutingHooks, split: ContextSplit) -> None:
        super().__init__()
        self.model = model
        self._hooks = [hooks]  # not a submodule
        self.split = split

    def forward(self, tokens: list[torch.Tensor], routing: RoutingPlan | None) -> torch.Tensor:
        return run_layers(self.model, tokens, self._hooks[0], routing, self.split)[0]


class _StageForwardFp32Router(_StageForward):
    """DeepSeek-V3's router weight stays fp32 whatever the compute dtype (as on the last stage)."""

    keep_in_fp32 = ("mlp.router.weight",)


class PipelineSteps:
    """The `NativeTrainer` hooks a megatron trainer with PP > 1 stages overrides (module docstring);
    at PP = 1 each one is the next class's (`_forward` is then the trainer's `_log_prob_forward`).
    Needs `self.pp` (`Stages`), `self.cp` (`ContextSplit`), `self.hf_config`, `self.cfg`,
    `self.model`, `self.routing` (each model's `RoutingHooks`) and `self._casts`."""

    pp: Stages

    def _forward(self, model: nn.Module, batch: TrainBatch, indices: list[int], routing=None):
        if self.pp.size == 1:
            return self._log_prob_forward(model, batch, indices, routing)
        tokens = [batch.tokens[i] for i in indices]
        received = None if self.pp.first else self._receive(tokens, self.pp.prev)
        earlier = self._receive_routing(model, tokens) if routing else None
        model.set_input_tensor(received)
        if self.pp.last:
            out, hidden = self._log_prob_forward(model, batch, indices, routing), None
        else:
            stage = (_StageForwardFp32Router if self.hf_config["model_type"] == "deepseek_v3" else _StageForward)(
                model, self.routing[id(model)], self.cp)
            hidden = call_in_dtype(stage, (tokens, routing), DTYPES[self.cfg.compute_dtype],
                                   self._casts if model is self.model else None)
            dist.send(hidden.detach().contiguous(), self.pp.next)
            empty = [torch.empty(0) for _ in indices]  # no log-probs here: the gather takes the last stage's
            out = (empty, empty)
        if routing:
            self._pass_routing(model, routing, earlier, tokens)
        self._in_flight = (received, hidden)
        return out

    def _micro_step(self, batch: TrainBatch, indices: list[int], *args) -> dict[str, float]:
        """The forward through the stages, the loss on the last, the backward back through them."""
        if self.pp.size == 1:
            return super()._micro_step(batch, indices, *args)
        if self.pp.last:
            metrics = super()._micro_step(batch, indices, *args)  # forward, loss, backward
        else:
            self._forward(self.model, batch, indices, self._routing_plan(batch, indices))
            hidden = self._in_flight[1]
            grad = torch.empty_like(hidden)
            dist.recv(grad, self.pp.next)
            hidden.backward(grad)
            self._casts.fold_grads()
            metrics = {}
        received, _ = self._in_flight
        if received is not None:
            dist.send(received.grad.contiguous(), self.pp.prev)
        self._in_flight = (None, None)
        return metrics

    def _receive(self, tokens: list[torch.Tensor], src: int) -> torch.Tensor:
        """The previous stage's (T, B, E) output for these samples, a leaf that keeps its gradient:
        under context parallelism this CP rank's T / CP rows (its two chunks), under sequence
        parallelism this TP rank's 1 / TP of those, as `run_layers` pads and splits them."""
        tp, cp = sequence_multiple(self.model), self.cp.size
        length = padded_length(tokens, tp * context_multiple(self.cp))
        shape = (length // (tp * cp), len(tokens), self.hf_config["hidden_size"])
        received = torch.empty(shape, dtype=DTYPES[self.cfg.compute_dtype], device=self.device)
        dist.recv(received, src)
        return received.requires_grad_(torch.is_grad_enabled())

    def _receive_routing(self, model: nn.Module, tokens: list[torch.Tensor]) -> np.ndarray | None:
        """The earlier stages' MoE records of these samples, (sum of len - 1, their MoE layers, K)
        int32 (sent after the hidden states); None on the first stage or after dense stages only."""
        hooks = self.routing[id(model)]
        if self.pp.first or not hooks.first:
            return None
        received = torch.empty((sum(len(t) - 1 for t in tokens), hooks.first, hooks.topk), dtype=torch.int32,
                               device=self.device)
        dist.recv(received, self.pp.prev)
        return received.cpu().numpy()

    def _pass_routing(self, model: nn.Module, routing: RoutingPlan, earlier: np.ndarray | None,
                      tokens: list[torch.Tensor]) -> None:
        """Put the earlier stages' records in front of this stage's (global MoE layer order); the
        last stage keeps them in `routing.recorded`, an earlier one sends them on and keeps none
        (its `_measure_routing` then measures nothing: the last stage's counts are the step's)."""
        hooks = self.routing[id(model)]
        if earlier is not None:
            parts = np.split(earlier, np.cumsum([len(t) - 1 for t in tokens])[:-1])
            routing.recorded = [np.concatenate([e, own], axis=1) for e, own in zip(parts, routing.recorded)]
        if self.pp.last:
            return
        if hooks.first + hooks.local:
            dist.send(torch.from_numpy(np.concatenate(routing.recorded)).to(self.device), self.pp.next)
        routing.recorded = []
