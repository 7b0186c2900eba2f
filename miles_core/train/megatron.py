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
- `save` writes the weights as a megatron-core `dist_checkpointing` torch_dist checkpoint (with
  the HF config in common.pt, so `miles convert` reads it) plus the optimizer, schedule and
  counters in `trainer_state.pt`.

MoE routing replay (`train.routing_replay`, R3) and the routing records behind
`routing_agreement` go through megatron's router (`megatron_routing.py`), as the native backend's.

Not in this version (refused with one line): model-parallel sizes > 1, bf16 compute, QAT, activation checkpointing, compile, the PPO critic. Runs on one rank; on CPU through
the patches of `megatron_env.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from miles_core.config import AlgoConfig, TrainConfig
from miles_core.errors import MilesError
from miles_core.kernels import FAST_OPS
from miles_core.kernels.logprobs import chunked_logprobs_entropy
from miles_core.models.base import named_weights
from miles_core.train import megatron_env
from miles_core.train.batch import TrainBatch, micro_batches, pad_ragged
from miles_core.train.finite import BadStepGuard
from miles_core.train.megatron_model import WeightMap, build_gpt, hf_config_of, output_weight
from miles_core.train.megatron_routing import RoutingHooks
from miles_core.train.native import NativeTrainer
from miles_core.train.offload import OptimizerOffload
from miles_core.train.routing_replay import RoutingPlan
from miles_core.train.optim import build_optimizer
from miles_core.train.speed import CastCache

CHECKPOINT_DIR = "torch_dist"
STATE_FILE = "trainer_state.pt"


def parallel_sizes(cfg: TrainConfig) -> megatron_env.ParallelSizes:
    return megatron_env.ParallelSizes(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                                      cfg.expert_model_parallel_size, cfg.context_parallel_size,
                                      cfg.sequence_parallel)


def check_options(cfg: TrainConfig, critic: bool) -> None:
    """Refuse the `[train]` options this backend does not implement, naming each."""
    refused = {
        "compute_dtype": (cfg.compute_dtype != "float32", "'float32'"),
        "qat": (cfg.qat != "off", "'off'"),
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


class MegatronTrainer(NativeTrainer):
    """`TrainBackend` whose policy (and reference) is a megatron-core `GPTModel`."""

    def __init__(self, native: nn.Module, cfg: TrainConfig, algo: AlgoConfig, *, temperature: float,
                 total_steps: int, reference: nn.Module | None = None) -> None:
        # NativeTrainer.__init__ is not called: it applies native-model options (QAT, speed) to
        # `model.model.layers`, which a GPTModel does not have; the same state is set up here.
        check_options(cfg, critic=algo.advantage_estimator == "ppo")
        self.device = next(native.parameters()).device
        sizes = parallel_sizes(cfg)
        megatron_env.check_sizes(sizes, self.device)
        megatron_env.start(self.device, sizes)
        self.hf_config = hf_config_of(native)
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
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), cfg, total_steps)
        self._offloads = [OptimizerOffload(self.optimizer)]  # unused: engine.colocate refuses this backend
        self.num_optimizer_steps = 0
        self._pass_metrics: dict[str, float] = {}
        self.guard = BadStepGuard(cfg.max_bad_steps)
        self._bad_samples: list[int] = []
        self._positions: list[int] = []
        self._casts = CastCache()  # stays empty: fp32 compute, no casts to fold
        self.qat_modules: list[str] = []

    def _build(self, native: nn.Module, sizes: megatron_env.ParallelSizes) -> tuple[nn.Module, WeightMap]:
        model = build_gpt(self.hf_config, sizes, self.device)
        weights = WeightMap(model, self.hf_config)
        weights.load({name: t.detach().to(self.device, torch.float32) for name, t in named_weights(native)})
        return model.train(), weights

    def _forward(self, model: nn.Module, batch: TrainBatch, indices: list[int], routing: RoutingPlan | None = None):
        tokens = [batch.tokens[i] for i in indices]
        lengths = [batch.response_lengths[i] for i in indices]
        hidden_NE, targets_N = response_hidden_states(model, tokens, lengths, self.routing[id(model)], routing)
        logp, entropy = chunked_logprobs_entropy(hidden_NE, output_weight(model), targets_N, self.temperature,
                                                 self.cfg.logprob_chunk_size, FAST_OPS)
        return list(logp.split(lengths)), list(entropy.split(lengths))

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
        """Weights as a megatron-core torch_dist checkpoint root (`miles convert` reads it), the rest
        (optimizer, schedule, counters, reference weights) in `trainer_state.pt`."""
        from megatron.core import dist_checkpointing

        directory.mkdir(parents=True, exist_ok=True)
        folder = directory / CHECKPOINT_DIR / "release"
        folder.mkdir(parents=True)
        state = {"model": self.model.sharded_state_dict(), "hf_config": self.hf_config,
                 "checkpoint_version": 3.0, "iteration": self.num_optimizer_steps}
        dist_checkpointing.save(state, str(folder))
        (directory / CHECKPOINT_DIR / "latest_checkpointed_iteration.txt").write_text("release", encoding="utf-8")
        with (directory / STATE_FILE).open("wb") as handle:  # a full disk is an OSError naming the file
            torch.save({
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "num_optimizer_steps": self.num_optimizer_steps, "bad_steps_in_row": self.guard.in_row,
                "reference": _tensors(self.reference) if self.reference is not None else None,
            }, handle)

    def load(self, directory: Path) -> None:
        from megatron.core import dist_checkpointing

        folder = directory / CHECKPOINT_DIR / "release"
        if not folder.is_dir():
            raise MilesError(f"'{directory}' holds no megatron trainer state ({CHECKPOINT_DIR}/release missing); "
                             "was it saved with another train.backend?")
        loaded = dist_checkpointing.load({"model": self.model.sharded_state_dict()}, str(folder))
        self.model.load_state_dict(loaded["model"], strict=True)
        state = torch.load(directory / STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.num_optimizer_steps = state["num_optimizer_steps"]
        self.guard.in_row = state.get("bad_steps_in_row", 0)
        if self.reference is not None and state.get("reference") is not None:
            self.reference.load_state_dict(state["reference"], strict=False)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors (megatron's `_extra_state` entries are not tensors and are left out)."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


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


def response_hidden_states(model: nn.Module, tokens: list[torch.Tensor], response_lengths: list[int],
                           hooks: RoutingHooks, routing: RoutingPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) hidden states that predict the N response tokens and those tokens (N,), as
    `batch.response_hidden_states` takes them from the native model; `routing` (MoE) replays
    and/or records the experts of every token through the router `hooks`."""
    device = output_weight(model).device
    ids_BT = pad_ragged(tokens).to(device)
    B, T = ids_BT.shape
    positions_BT = torch.arange(T, device=device)[None, :].expand(B, T)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=device), diagonal=1)[None, None]  # True: masked
    ctx = routing.context([(b, 0, len(t) - 1) for b, t in enumerate(tokens)], T, device) if routing else None
    with _hidden_states_only(model), hooks.active(ctx, B, T):
        hidden_TBE = model(ids_BT, positions_BT, attention_mask=causal)  # megatron's [s, b, h] layout
    if routing:
        ids_BTLK = ctx.stacked()
        routing.recorded = [ids_BTLK[b, : len(t) - 1] for b, t in enumerate(tokens)]
    hidden_BTE = hidden_TBE.transpose(0, 1)
    rows = torch.cat([torch.full((r,), i) for i, r in enumerate(response_lengths)]).to(device)
    cols = torch.cat([torch.arange(len(t) - r - 1, len(t) - 1) for t, r in zip(tokens, response_lengths)]).to(device)
    return hidden_BTE[rows, cols], ids_BT[rows, cols + 1]
