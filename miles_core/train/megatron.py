"""`train.backend = "megatron"`: the policy is a megatron-core `GPTModel` (`megatron_model.py`),
trained by the native trainer's update (`NativeTrainer`: micro-batches, `algo/` losses, AdamW,
gradient clipping, LR schedule, non-finite step guard), which this class inherits.

What differs from the native backend:
- the forward: megatron-core's model runs each micro-batch right-padded with a causal mask and
  returns its final hidden states (output layer switched off); our chunked log-prob kernel
  applies the output weight, so full (T, V) logits never exist. Whole sequences always run:
  `train.share_prompt_prefix` and `pack_sequences` are native-model shortcuts with the same result
  and are not used here;
- weights come from the engine side's native model through `miles convert`'s mapping, in
  memory, and `export_weights` maps them back (HF names, full tensors);
- `save` writes the weights, AdamW's moments and the reference model as one megatron-core
  `dist_checkpointing` torch_dist checkpoint (with the HF config in common.pt, so `miles convert`
  reads it), the schedule and counters in `trainer_state.pt` (`megatron_checkpoint.py`).

Parallelism over N ranks, one process each (`miles train --nproc-per-node N`), rank 0 leading
the others (`leader.py`), so every rank runs the same calls:
- tensor parallelism (`train.tensor_model_parallel_size` = TP; dense families, and the MoE ones
  with sequence parallelism, which megatron-core needs to train MoE layers so): megatron-core
  splits the layers (MLA by heads, its down projections replicated: `megatron_mla.py`); each
  rank loads its shard of every full tensor (`megatron_shards.py`),
  computes its vocabulary slice's log-probs and entropies with the softmax completed over the TP
  group (`vocab_parallel.py`) and sums the q/k norms' partial gradients; with
  `train.sequence_parallel` megatron-core also splits the sequence (padded to a multiple of TP)
  over the TP ranks between its split layers, the norms' (and MoE routers') gradients are summed
  over them (`megatron_model.SequenceParallelRMSNorm`), routing replay gathers the routers' parts
  of the sequence (`megatron_routing.py`) and the final hidden states are gathered for the
  log-probs;
- expert parallelism (`train.expert_model_parallel_size` = EP, MoE families): each rank holds
  1/EP of the routed experts (allgather dispatcher) and a copy of the rest; the EP ranks of one
  replica run the same micro-batches, so expert gradients are divided by EP (each expert saw
  every rank's copy of the tokens) and the copies' gradients averaged;
- pipeline parallelism (`train.pipeline_model_parallel_size` = PP, every family): each stage
  holds its layers (the first the embedding, the last the final norm and output layer), one
  micro-batch in flight through the stages, the loss on the last (`megatron_pipeline.py`); MoE:
  each stage replays and records its own MoE layers, the records sent on with the activations
  to the last stage, in the global layer order;
- context parallelism (`train.context_parallel_size` = CP; every family, MLA too; with TP, and
  sequence parallelism, EP or PP beside it): each sequence (padded to a multiple of 2 x CP) is cut
  into 2 x CP chunks and CP rank r runs chunks r and 2 x CP - 1 - r (megatron's load-balanced
  split; megatron-core's RoPE takes the same chunks), its attention all-gathers K and V over the
  CP group (`megatron_context.py`: megatron-core's local attention asserts CP = 1), each rank's
  response log-probs are gathered back into sequence order so every CP rank computes the whole
  loss, and the gradients are summed over the CP ranks with the data-parallel replicas (experts
  over megatron's expert-data-parallel group, which spans the CP ranks: each CP rank routes its
  own chunks);
- data parallelism beside any of them, as megatron does it: DP = N / (TP x CP x EP x PP) replicas
  of the model (`megatron_data.py`): each replica trains its token-balanced share of every optimizer step,
  the gradients are summed over the replicas in flattened buckets (experts over megatron's
  expert-data-parallel group), log-probs and metrics are gathered from the replicas;
  `train.use_distributed_optimizer` shards AdamW over them instead (ZeRO-1, `megatron_zero.py`).
The gradient norm is the whole model's; `export_weights` gathers the full tensors on rank 0 from
the first replica. TP and EP together (MoE families, with sequence parallelism): each expert split
over TP within its EP rank, as megatron-core places it. PP and EP together (MoE families): each
stage's routed experts split over its EP ranks, which run the stage's micro-batches alike.
PP and CP together: each stage's CP ranks hold their two chunks of every sequence, the stages
pass those T / CP rows on, the last stage gathers the log-probs over its CP ranks.

MoE routing replay (`train.routing_replay`, R3) and the routing records behind
`routing_agreement` go through megatron's router (`megatron_routing.py`), as the native backend's.

Not in this version (refused with one line): QAT, FP8 GEMMs, activation
checkpointing, compile, the PPO critic.
`train.compute_dtype = "bfloat16"` casts the parameters for each forward (`batch.call_in_dtype`,
as the native trainer; DeepSeek-V3's router stays fp32). On CPU through the patches of
`megatron_env.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from miles_core.checkpoint.loading import DTYPES
from miles_core.config import AlgoConfig, TrainConfig
from miles_core.errors import MilesError
from miles_core.kernels import FAST_OPS
from miles_core.kernels.logprobs import chunked_logprobs_entropy
from miles_core.models.base import named_weights
from miles_core.train import megatron_checkpoint, megatron_data, megatron_env, megatron_pipeline, megatron_shards
from miles_core.train.batch import TrainBatch, call_in_dtype, micro_batches
from miles_core.train.finite import BadStepGuard
from miles_core.train.megatron_context import ContextSplit, ResponseRows, context_split
from miles_core.train.megatron_model import WeightMap, build_gpt, check_model_parallel, hf_config_of, output_weight
from miles_core.train.megatron_routing import RoutingHooks
from miles_core.train.megatron_zero import ZeroOptimizer
from miles_core.train.native import NativeTrainer
from miles_core.train.offload import OptimizerOffloads
from miles_core.train.routing_replay import RoutingPlan
from miles_core.train.optim import build_optimizer, clip_grad_norm
from miles_core.train.parallelize import broadcast_module
from miles_core.train.speed import CastCache
from miles_core.train.vocab_parallel import vocab_parallel_logprobs_entropy


def parallel_sizes(cfg: TrainConfig) -> megatron_env.ParallelSizes:
    return megatron_env.ParallelSizes(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                                      cfg.expert_model_parallel_size, cfg.context_parallel_size,
                                      cfg.sequence_parallel)


def check_options(cfg: TrainConfig, critic: bool) -> None:
    """Refuse the `[train]` options this backend does not implement, naming each."""
    refused = {
        "qat": (cfg.qat != "off", "'off'"),
        # FP8 GEMMs under megatron-core are Transformer Engine's; without it they would silently be bf16.
        "precision": (cfg.precision != "bf16", "'bf16' (FP8 under megatron needs Transformer Engine)"),
        "activation_checkpointing": (cfg.activation_checkpointing, "false"),
        "compile": (cfg.compile, "false"),
    }
    for name, (bad, allowed) in refused.items():
        if bad:
            raise MilesError(f"train.{name} = {getattr(cfg, name)!r} is not supported with train.backend = "
                             f"'megatron' yet; expected {allowed}")
    if critic:
        raise MilesError("algo.advantage_estimator = 'ppo' (a critic) is not supported with train.backend = "
                         "'megatron' yet; use grpo, rloo, reinforce_plus_plus or another critic-free estimator")


class MegatronTrainer(megatron_pipeline.PipelineSteps, megatron_data.DataParallelSteps, NativeTrainer):
    """`TrainBackend` whose policy (and reference) is a megatron-core `GPTModel`; with PP > 1
    stages the pipelined steps of `megatron_pipeline.py`, with DP > 1 replicas (or PP > 1, whose
    results come from the last stage) the data-parallel steps of `megatron_data.py`."""

    def __init__(self, native: nn.Module, cfg: TrainConfig, algo: AlgoConfig, *, temperature: float,
                 total_steps: int, reference: nn.Module | None = None) -> None:
        # NativeTrainer.__init__ is not called: it applies native-model options (QAT, speed) to
        # `model.model.layers`, which a GPTModel does not have; the same state is set up here.
        check_options(cfg, critic=algo.advantage_estimator == "ppo")
        self.device = next(native.parameters()).device
        sizes = parallel_sizes(cfg)
        self.world_size = world = dist.get_world_size() if dist.is_initialized() else 1
        megatron_env.check_sizes(sizes, world)
        self.hf_config = hf_config_of(native)
        check_model_parallel(self.hf_config, sizes)
        megatron_env.start(self.device, sizes)
        self._parallel_groups()
        # Calls from rank 0 to the others (`leader.py`) travel on a gloo group of their own.
        self.control_group = dist.new_group(backend="gloo") if world > 1 else None
        torch.manual_seed(cfg.seed)
        self.model, self.weights = self._build(native, sizes)
        self.routing = {id(self.model): RoutingHooks(self.model)}
        self.reference = None
        if reference is not None:
            self.reference, _ = self._build(reference, sizes)
            self.routing[id(self.reference)] = RoutingHooks(self.reference)
            self.reference.requires_grad_(False).eval()
        self.cfg, self.algo, self.critic = cfg, algo, None
        self.temperature = temperature if temperature > 0 else 1.0
        self.zero = ZeroOptimizer(self.model, cfg, total_steps, self.ep_size, self.weights.replica_duplicates) \
            if cfg.use_distributed_optimizer else None
        self.optimizer, self.scheduler = (self.zero.optimizer, self.zero.scheduler) if self.zero else \
            build_optimizer(self.model.parameters(), cfg, total_steps)
        self._offloads = OptimizerOffloads([self.optimizer])  # unused: engine.colocate refuses this backend
        self.num_optimizer_steps = 0
        self._pass_metrics: dict[str, float] = {}
        self.guard = BadStepGuard(cfg.max_bad_steps)
        self._bad_samples: list[int] = []
        self._positions: list[int] = []
        self._casts = CastCache()  # the policy's compute-dtype weights, cast once per optimizer step
        self.qat_modules: list[str] = []

    def _parallel_groups(self) -> None:
        """The TP group, this rank's place in it and its first vocabulary row; the EP size; the
        data-parallel replicas."""
        from megatron.core import parallel_state

        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.vocab_start = self.tp_rank * self.hf_config["vocab_size"] // self.tp_size
        self.ep_size = parallel_state.get_expert_model_parallel_world_size()
        self.cp = context_split()
        self.dp = megatron_data.replicas()
        self.pp = megatron_pipeline.stages()
        self._in_flight = (None, None)  # a pipeline stage's received input and sent output

    def _build(self, native: nn.Module, sizes: megatron_env.ParallelSizes) -> tuple[nn.Module, WeightMap]:
        if self.world_size > 1:
            broadcast_module(native)  # rank 0's weights on every rank, however each one loaded them
        model = build_gpt(self.hf_config, sizes, self.device)
        weights = WeightMap(model, self.hf_config)
        weights.load({name: t.detach().to(self.device, torch.float32) for name, t in named_weights(native)})
        return model.train(), weights

    def _log_prob_forward(self, model: nn.Module, batch: TrainBatch, indices: list[int],
                          routing: RoutingPlan | None = None):
        """The last (only) stage's log-prob forward (`_forward` with the stages: `megatron_pipeline.py`).
        In `train.compute_dtype` as the native trainer: the parameters cast for the call
        (differentiably, onto the fp32 masters), activations in that dtype end to end."""
        step = (_LogProbForwardFp32Router if self.hf_config["model_type"] == "deepseek_v3" else _LogProbForward)(
            self, model)
        return call_in_dtype(step, (batch, indices, routing), DTYPES[self.cfg.compute_dtype],
                             self._casts if model is self.model else None)

    def _forward_in_dtype(self, model: nn.Module, batch: TrainBatch, indices: list[int],
                          routing: RoutingPlan | None = None):
        tokens = [batch.tokens[i] for i in indices]
        lengths = [batch.response_lengths[i] for i in indices]
        hidden_NE, targets_N, where = response_hidden_states(model, tokens, lengths, self.routing[id(model)], routing,
                                                             self.cp)
        if self.tp_size > 1:  # this rank's vocabulary slice of the output layer
            logp, entropy = vocab_parallel_logprobs_entropy(hidden_NE, output_weight(model), targets_N, self.temperature,
                                                            self.cfg.logprob_chunk_size, self.tp_group,
                                                            self.vocab_start, FAST_OPS)
        else:
            logp, entropy = chunked_logprobs_entropy(hidden_NE, output_weight(model), targets_N, self.temperature,
                                                     self.cfg.logprob_chunk_size, FAST_OPS)
        if where is not None:  # context parallelism: every CP rank's tokens, in sequence order
            logp, entropy = where.gather(logp, entropy)
        return list(logp.split(lengths)), list(entropy.split(lengths))

    def _clip_grads(self) -> float:
        """Over several ranks: the gradients completed within the replica
        (`megatron_shards.reduce_grads`: the TP q/k norms) and over the replicas and EP copies
        (`megatron_data.reduce_grads`), then the whole model's norm, the same on every rank."""
        if self.zero is not None:  # the masters' gradient slices (`megatron_zero.py`)
            megatron_shards.reduce_grads(self.model, self.tp_group, self.tp_size)
            # the tied embedding's two pipeline ends first: after the reduce-scatter each holds slices only
            megatron_pipeline.reduce_embedding_grads(self.model, self.pp)
            self.zero.reduce_scatter_grads()
            return clip_grad_norm([g.master for g in self.zero.groups], self.cfg, self.zero.grad_norm())
        if self.world_size == 1:
            return super()._clip_grads()
        megatron_shards.reduce_grads(self.model, self.tp_group, self.tp_size)
        megatron_data.reduce_grads(self.model, self.ep_size)
        megatron_pipeline.reduce_embedding_grads(self.model, self.pp)
        params = list(self.model.parameters())
        norm = megatron_shards.grad_norm(params, self.weights.duplicates)
        return clip_grad_norm(params, self.cfg, norm)

    def _moe_shape(self) -> tuple[int, int]:
        hooks = self.routing[id(self.model)]
        return hooks.layers, hooks.topk

    def _micro_batches(self, batch: TrainBatch) -> list[list[int]]:
        return micro_batches([len(t) for t in batch.tokens], self.cfg.max_tokens_per_micro_batch,
                             self.cfg.micro_batch_size)

    def update_reference(self) -> None:
        if self.reference is None:
            raise ValueError("no reference model: enable algo.use_kl_loss or algo.kl_coef > 0 to keep one")
        self.reference.load_state_dict(self.model.state_dict())

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.weights.export()

    def save(self, directory: Path) -> None:
        """Every rank: the torch_dist checkpoint (weights, AdamW moments, reference); rank 0 also
        `trainer_state.pt` (schedule, counters); see `megatron_checkpoint.py`."""
        directory.mkdir(parents=True, exist_ok=True)
        common = {"hf_config": self.hf_config, "checkpoint_version": 3.0, "iteration": self.num_optimizer_steps}
        small = {"scheduler": self.scheduler.state_dict(), "num_optimizer_steps": self.num_optimizer_steps,
                 "bad_steps_in_row": self.guard.in_row}
        optimizer = self.zero.full_optimizer() if self.zero else self.optimizer  # ZeRO: the plain layout
        megatron_checkpoint.save(directory, self.model, optimizer, self.reference, common, small)

    def load(self, directory: Path) -> None:
        optimizer = self.zero.full_optimizer() if self.zero else self.optimizer
        small = megatron_checkpoint.load(directory, self.model, optimizer, self.reference, self.device)
        if self.zero is not None:
            self.zero.load_full(optimizer)
        self.scheduler.load_state_dict(small["scheduler"])
        self.num_optimizer_steps = small["num_optimizer_steps"]
        self.guard.in_row = small.get("bad_steps_in_row", 0)


class _LogProbForward(nn.Module):
    """The policy (or reference) forward as one module, so `call_in_dtype` casts its parameters."""

    def __init__(self, trainer: MegatronTrainer, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._trainer = [trainer]  # not a submodule

    def forward(self, batch: TrainBatch, indices: list[int], routing: RoutingPlan | None):
        return self._trainer[0]._forward_in_dtype(self.model, batch, indices, routing)


class _LogProbForwardFp32Router(_LogProbForward):
    """DeepSeek-V3 keeps its router weight in fp32 whatever the compute dtype (as HF and the
    native model do)."""

    keep_in_fp32 = ("mlp.router.weight",)


@contextlib.contextmanager
def _hidden_states_only(model: nn.Module):
    """GPTModel returns its decoder's (final-normed) hidden states when `post_process` is off at
    call time; the output layer is then applied by the chunked log-prob kernel instead."""
    saved = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = saved


def sequence_parallel_gather(hidden_TBE: torch.Tensor) -> torch.Tensor:
    """All TP ranks' sequence shards, in order. Backward keeps this rank's shard of the gradient:
    the vocab-parallel log-prob kernel has already summed every rank's share of it
    (`vocab_parallel.py`), so no reduce-scatter is needed here."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(hidden_TBE, tensor_parallel_output_grad=False)


def response_hidden_states(model: nn.Module, tokens: list[torch.Tensor], response_lengths: list[int],
                           hooks: RoutingHooks, routing: RoutingPlan | None = None,
                           split: ContextSplit = ContextSplit()) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(N, E) hidden states that predict the N response tokens and those tokens (N,), as
    `batch.response_hidden_states` takes them from the native model; `routing` (MoE) replays
    and/or records the experts of every token through the router `hooks`. Under context
    parallelism (`split`) only this rank's n of the N; third, where they sit (`ResponseRows`; None
    without CP)."""
    device = output_weight(model).device
    # Under pipeline stages `routing.recorded` is this stage's MoE layers (the pipeline adds the others').
    with _hidden_states_only(model):
        hidden_TBE, ids_BT = megatron_pipeline.run_layers(model, tokens, hooks, routing, split)
    if model.config.sequence_parallel:  # this rank's 1/TP of the sequence: gather it whole
        hidden_TBE = sequence_parallel_gather(hidden_TBE)
    hidden_BTE = hidden_TBE.transpose(0, 1)
    rows = torch.cat([torch.full((r,), i) for i, r in enumerate(response_lengths)]).to(device)
    cols = torch.cat([torch.arange(len(t) - r - 1, len(t) - 1) for t, r in zip(tokens, response_lengths)]).to(device)
    if split.size == 1:
        return hidden_BTE[rows, cols], ids_BT[rows, cols + 1], None
    where = ResponseRows.build(ids_BT, rows, cols, split)
    return hidden_BTE[where.rows, where.cols], where.targets, where
