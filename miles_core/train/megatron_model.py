"""megatron-core `GPTModel`s for the megatron trainer: built from a HF config, with weights moved in
and out through `miles convert`'s name mapping (`checkpoint/mapping`), in memory.

The model is megatron-core's own: its layer spec is the Transformer Engine one when
`transformer_engine` imports, the local (plain PyTorch) one otherwise. Families: llama, qwen2,
qwen3 (GQA, optional q/k/v bias and q/k norm), qwen3_moe (softmax top-k router, allgather
dispatcher) and deepseek_v3 (megatron-core's multi-latent attention with our own core attention
on the local spec, sigmoid group-limited router with shared experts; `megatron_mla.py`; MTP
layers are not built). Under context parallelism every layer's core attention is
`megatron_context.ContextParallelAttention` (the local spec's asserts CP = 1; it replaces
Transformer Engine's too, so one tested path runs everywhere).

`WeightMap` ties every parameter to its mapping slot: `sharded_state_dict()` names each one with
the key megatron-core checkpoints use (stacked over layers, experts under
`mlp.experts.experts.`), which is what the mapping's slots describe; the layer and expert index
come from the parameter's module path (plus the stage's first layer under pipeline parallelism,
whose paths count the stage's layers only) and an expert's global index from its sharded tensor.
Under tensor parallelism each slot holds this rank's shards (MLA's down projections and their
norms whole, replicated: `megatron_mla.py`), under expert parallelism each rank has its own
experts' slots, placed by the same sharded tensors (`megatron_shards.py`); under pipeline
parallelism each stage has its own layers' slots, and the last stage's tied output layer is a
non-main copy of the embedding's slot.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from miles_core.checkpoint import mapping
from miles_core.checkpoint.mapping.base import TRANSFORMS, Slot, rope_theta
from miles_core.errors import MilesError
from miles_core.train import megatron_context, megatron_mla, megatron_shards
from miles_core.train.megatron_env import ParallelSizes

SUPPORTED = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")
_LAYER = re.compile(r"(decoder|mtp)\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def hf_config_of(model: nn.Module) -> dict[str, Any]:
    """The HF config fields a native model was built from (its `args`), as a HF config dict."""
    args = dataclasses.asdict(model.args)
    if args["model_type"] not in SUPPORTED:
        raise MilesError(f"train.backend = 'megatron' does not support model_type '{args['model_type']}' yet; "
                         f"expected one of: {', '.join(SUPPORTED)}")
    if args.get("rope_scaling") and args["rope_scaling"].get("rope_type", "default") != "default":
        raise MilesError(f"train.backend = 'megatron' does not support rope_scaling {args['rope_scaling']} yet; "
                         "expected none (plain RoPE)")
    if args["model_type"] == "deepseek_v3":
        megatron_mla.check_mla(args)
    if args["model_type"] == "qwen3_moe":
        moe = set(args.pop("moe_layers"))
        args.update(mlp_only_layers=[i for i in range(args["num_hidden_layers"]) if i not in moe],
                    decoder_sparse_step=1)
    return args


TENSOR_PARALLEL = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")
"""Families that run with tensor parallelism; the MoE ones with sequence parallelism (megatron-core
trains MoE layers tensor-parallel only with it); MLA split by heads (`megatron_mla.py`)."""
PIPELINE_PARALLEL = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")
"""Families that run with pipeline stages; MoE: each stage replays and records its own MoE layers,
the records gathered on the last stage in layer order (`megatron_pipeline.py`)."""
CONTEXT_PARALLEL = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")
"""Families that run with context parallelism (every one: MLA's core attention is replaced like
the others', its RoPE table sliced by megatron-core's CP split)."""
EXPERT_PARALLEL = {"qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}
"""Families that run with expert parallelism, with the HF field that counts their routed experts."""


def check_model_parallel(cfg: dict[str, Any], sizes: ParallelSizes) -> None:
    """Refuse a TP or EP size the model cannot be split by (megatron-core would assert), naming the flag."""
    checks = [("--tensor-model-parallel-size", sizes.tensor, TENSOR_PARALLEL, {
        "num_attention_heads": cfg.get("num_attention_heads"), "intermediate_size": cfg.get("intermediate_size"),
        "num_key_value_heads": cfg.get("num_key_value_heads") or cfg.get("num_attention_heads"),
        "vocab_size": cfg["vocab_size"], **({"moe_intermediate_size": cfg["moe_intermediate_size"]}
                                            if "moe_intermediate_size" in cfg else {})})]
    experts = EXPERT_PARALLEL.get(cfg["model_type"])
    checks.append(("--expert-model-parallel-size", sizes.expert, tuple(EXPERT_PARALLEL),
                   {experts: cfg[experts]} if experts else {}))
    checks.append(("--pipeline-model-parallel-size", sizes.pipeline, PIPELINE_PARALLEL,
                   {"num_hidden_layers": cfg["num_hidden_layers"]}))
    checks.append(("--context-parallel-size", sizes.context, CONTEXT_PARALLEL, {}))  # sequences are padded
    for flag, size, families, dims in checks:
        if size == 1:
            continue
        if cfg["model_type"] not in families:
            raise MilesError(f"{flag} {size} is not supported for model_type '{cfg['model_type']}' yet; expected "
                             f"one of: {', '.join(families)} (or size 1)")
        for name, value in dims.items():
            if value % size:
                raise MilesError(f"{flag} {size} does not divide the model's {name} {value}; use a size that divides it")
    if sizes.tensor > 1 and cfg["model_type"] in EXPERT_PARALLEL and not sizes.sequence_parallel:
        raise MilesError(f"--tensor-model-parallel-size {sizes.tensor} for model_type '{cfg['model_type']}' needs "
                         "--sequence-parallel (megatron-core trains MoE layers tensor-parallel only with it); add it")


def transformer_config(cfg: dict[str, Any], sizes: ParallelSizes, *, cpu: bool):
    """megatron-core's `TransformerConfig` for a HF config, fp32 parameters, no dropout."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    heads = mapping.family_for(cfg["model_type"]).heads(cfg) or megatron_mla.mla_heads(cfg)
    moe: dict[str, Any] = {}
    config_class = TransformerConfig
    if cfg["model_type"] == "deepseek_v3":
        config_class, moe = MLATransformerConfig, megatron_mla.mla_config_fields(cfg)
    if cfg["model_type"] == "qwen3_moe":
        num_layers = cfg["num_hidden_layers"]
        moe = dict(num_moe_experts=cfg["num_experts"], moe_router_topk=cfg["num_experts_per_tok"],
                   moe_ffn_hidden_size=cfg["moe_intermediate_size"],
                   # top-k then softmax over the k (megatron's default) is Qwen's norm_topk_prob
                   moe_router_pre_softmax=not cfg["norm_topk_prob"],
                   moe_layer_freq=[int(i not in cfg["mlp_only_layers"]) for i in range(num_layers)],
                   moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
                   moe_aux_loss_coeff=0.0)
    return config_class(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads.num_heads,
        num_query_groups=heads.num_query_groups, kv_channels=heads.head_dim,
        normalization="RMSNorm", layernorm_epsilon=cfg["rms_norm_eps"], gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=cfg["model_type"] == "qwen2",
        qk_layernorm=cfg["model_type"] in ("qwen3", "qwen3_moe", "deepseek_v3"), hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32, use_cpu_initialization=cpu, perform_initialization=False,
        tensor_model_parallel_size=sizes.tensor, pipeline_model_parallel_size=sizes.pipeline,
        expert_model_parallel_size=sizes.expert, context_parallel_size=sizes.context,
        sequence_parallel=sizes.sequence_parallel,
        # megatron's own pipeline schedules read it; ours (`megatron_pipeline.py`) sends fp32 or bf16 as computed
        pipeline_dtype=torch.float32 if sizes.pipeline > 1 else None, **moe)


def build_gpt(cfg: dict[str, Any], sizes: ParallelSizes, device: torch.device) -> nn.Module:
    """A megatron-core `GPTModel` for `cfg` on `device` (weights uninitialised: load them next)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    config = transformer_config(cfg, sizes, cpu=device.type == "cpu")
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=have_transformer_engine(),
                                      normalization="RMSNorm")
    if config.multi_latent_attention and not have_transformer_engine():
        megatron_mla.use_local_spec(spec)
    if config.sequence_parallel and not have_transformer_engine():
        spec = _sequence_parallel_norms(spec)
    if config.context_parallel_size > 1:
        spec = megatron_context.use_context_parallel_attention(spec)
    from megatron.core import parallel_state

    # Pipeline stages: the first holds the embedding, the last the final norm and output layer (the
    # embedding's copy when tied); megatron-core picks each stage's layers from the parallel state.
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=cfg["vocab_size"],
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     max_sequence_length=cfg["max_position_embeddings"], position_embedding_type="rope",
                     rotary_base=rope_theta(cfg), share_embeddings_and_output_weights=cfg["tie_word_embeddings"])
    # The local spec's norms (torch.nn.RMSNorm) are built on the host whatever the config says;
    # megatron's own training scripts move the model with `.cuda()` for the same reason.
    return model.to(device)


class HeadRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm as megatron-core's local spec builds it, for the q/k norms under sequence
    parallelism: they run after the q/k projection has gathered the whole sequence (per head, on
    this rank's heads), so nothing changes for them; this class only replaces the local spec's
    norm, which refuses to be built with sequence parallelism on."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__(hidden_size, eps=eps)


class SequenceParallelRMSNorm(HeadRMSNorm):
    """The same norm with its weight marked `sequence_parallel`, as Transformer Engine's and
    Apex's norms mark theirs: under sequence parallelism each TP rank normalises 1/TP of the
    tokens, so the weight's gradient is partial and summed over the TP group
    (`megatron_shards.reduce_grads`)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__(config, hidden_size, eps)
        self.weight.sequence_parallel = True


def _sequence_parallel_norms(block_spec):
    """A copy of the block spec whose local norms (megatron-core's `WrappedTorchNorm` asserts that
    sequence parallelism is off: only TE and Apex norms support it) are the same torch RMSNorm,
    marked; slots without a norm (llama's q/k) stay as they are. MLA's q/kv norms act on the
    replicated latents of this rank's tokens (`megatron_mla.py`): marked like the layer norms."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    block_spec = copy.deepcopy(block_spec)  # the spec builders may hand out shared objects
    for layer in block_spec.layer_specs:
        attention = layer.submodules.self_attention.submodules
        mla = hasattr(attention, "kv_layernorm")
        for owner, names, norm in ((layer.submodules, ("input_layernorm", "pre_mlp_layernorm"), SequenceParallelRMSNorm),
                                   (attention, ("q_layernorm", "kv_layernorm"), SequenceParallelRMSNorm) if mla else
                                   (attention, ("q_layernorm", "k_layernorm"), HeadRMSNorm)):
            for name in names:
                if getattr(owner, name, None) is WrappedTorchNorm:
                    setattr(owner, name, norm)
    if block_spec.layer_norm is WrappedTorchNorm:
        block_spec.layer_norm = SequenceParallelRMSNorm
    return block_spec


def output_weight(model: nn.Module) -> torch.Tensor:
    """The (V, E) output layer weight (the embedding when tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


class WeightMap:
    """Each parameter of a `GPTModel` tied to its mapping slot: HF tensors in and out. Under
    tensor parallelism a slot's parameter is this rank's shard (`megatron_shards.py`)."""

    def __init__(self, model: nn.Module, cfg: dict[str, Any]) -> None:
        self.plan = mapping.plan(mapping.family_for(cfg["model_type"]), cfg, 0)  # no MTP layers
        self.mtp: dict[str, torch.Tensor] = {}
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # Buffers too: DeepSeek-V3's router selection bias is one (`mlp.router.expert_bias`).
        params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        names = {p.data_ptr(): n for n, p in params.items()}
        # A pipeline stage's module paths count its own layers; megatron numbers them globally from 1.
        offset = model.decoder.layers[0].layer_number - 1 if len(model.decoder.layers) else 0
        self.shards: dict[Slot, list[megatron_shards.Shard]] = {}
        self.duplicates: set[int] = set()
        """ids of the parameters this rank holds as a replica (not the main copy)."""
        self.replica_duplicates: set[int] = set()
        """ids of those that another rank of this model replica holds the main copy of (TP copies)."""
        for item in model.sharded_state_dict().values():
            data = getattr(item, "data", None)
            if data is None or data.data_ptr() not in names:  # `_extra_state` objects, buffers
                continue
            name = names[data.data_ptr()]
            shards = megatron_shards.shards_of(item)
            self.shards[self.plan.canonical(_slot(item.key, name, shards[0].stacked, offset))] = shards
            if not all(s.main for s in shards):
                self.duplicates.add(id(params[name]))
            if not all(s.replica_main for s in shards):
                self.replica_duplicates.add(id(params[name]))
        # Every rank's main pieces: expert parallelism splits the routed experts over the ranks,
        # pipeline stages the layers; together they cover the whole mapping.
        self.pieces = megatron_shards.layout(self.shards)
        expected = {link.slot for link in self.plan.links}
        missing, extra = expected - self.pieces.keys(), self.shards.keys() - expected
        if missing or extra:
            raise MilesError(f"megatron-core's {cfg['model_type']} model does not match the convert mapping: "
                             f"missing {sorted(s.describe() for s in missing)[:3]}, "
                             f"unexpected {sorted(s.describe() for s in extra)[:3]}")
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def load(self, hf: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors into the model (fused as `miles convert` fuses them), each rank
        its own region of every full tensor (and only its own experts)."""
        for link in self.plan.links:
            if link.slot not in self.shards:
                continue
            missing = [n for n in link.hf_names if n not in hf]
            if missing:
                raise MilesError(f"the HF weights lack {missing[0]} (needed for {link.slot.describe()})")
            parts = [hf[n] for n in link.hf_names]
            tensor = TRANSFORMS[link.transform].fuse(parts, self.plan.heads, link.hf_names)
            for shard in self.shards[link.slot]:
                if tuple(tensor.shape) != shard.full_shape:
                    raise MilesError(f"shape mismatch for {link.slot.describe()}: megatron-core has "
                                     f"{shard.full_shape}, the HF weights give {tuple(tensor.shape)}")
                shard.data.copy_(tensor[shard.region()])
        self.mtp = {name: tensor.clone() for name, tensor in hf.items() if _mtp_layer(name, self.plan.num_layers)}

    def export(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named full tensors of the current weights (tied weights once), split as `miles convert`
        splits them; then the MTP layers' tensors as they were loaded (not built, not trained).
        Under tensor parallelism a collective: rank 0 yields the gathered tensors, the other
        ranks send their shards as it goes and yield nothing."""
        for link in self.plan.links:
            full = megatron_shards.assemble(self.shards.get(link.slot, []), self.pieces[link.slot], self.rank,
                                            self.device)
            if full is not None:
                yield from zip(link.hf_names, TRANSFORMS[link.transform].split(full, self.plan.heads, link.slot.name))
        if self.rank == 0:
            yield from self.mtp.items()


def _mtp_layer(hf_name: str, num_layers: int) -> bool:
    """Whether a HF tensor belongs to an MTP layer (`model.layers.{i}.` with i >= num_layers)."""
    match = re.match(r"model\.layers\.(\d+)\.", hf_name)
    return match is not None and int(match[1]) >= num_layers


def _slot(key: str, param_name: str, stacked: tuple[int, ...], offset: int = 0) -> Slot:
    """The slot of a sharded-state-dict key, its layer read off the parameter's path and a routed
    expert's global index off its sharded tensor (the last stacked axis; under expert parallelism
    the path's `local_experts.{i}` counts this rank's experts only)."""
    layer = _LAYER.match(param_name)
    if layer is None:
        return Slot("", -1, -1, key)
    name = re.sub(r"^(decoder|mtp)\.layers\.(\d+\.)?", "", key)
    expert = stacked[-1] if _EXPERT.search(param_name) else -1
    return Slot(layer[1], int(layer[2]) + (offset if layer[1] == "decoder" else 0), expert, name)
