"""What every family's HF <-> Megatron map is made of, and how a map becomes a conversion plan.

A family declares, per scope, a key map from HF names to megatron-core names (None = drop), the
megatron names that fuse several HF tensors with the named transform that does it, and the
aliases: names megatron-core writes with its local (non Transformer Engine) layer spec for a
tensor whose canonical name is the Transformer Engine one. `plan()` expands those maps for one
model config into `Link`s, one per megatron tensor ("slot"): which HF tensors fill it and how.

Scopes and prefixes (megatron names are the ones `GPTModel.sharded_state_dict()` produces):
- model-wide: full names on both sides (`model.embed_tokens.weight` <-> `embedding.word_embeddings.weight`);
- decoder layer i: `model.layers.{i}.` <-> a `decoder.layers.*` tensor at layer i;
- routed expert e of layer i: `model.layers.{i}.mlp.experts.{e}.` <-> `mlp.experts.experts.*` at expert e;
- MTP layer k: `model.layers.{num_layers + k}.` <-> `mtp.layers.{k}.` (the layer itself under
  `transformer_layer.`), as DeepSeek-V3 checkpoints store their next-token-prediction layers.

Transforms (HF parts, in key-map order <-> one megatron tensor):
- `qkv`: q (H*D, E), k (G*D, E), v (G*D, E) -> rows grouped by KV head g: [q heads of g | k_g | v_g],
  i.e. (G, (H/G + 2) * D, E) flattened; biases the same without the last dim;
- `gate_up`: gate (F, E), up (F, E) -> cat along rows (megatron's `linear_fc1` of a SwiGLU MLP);
- `copy`: one tensor, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from miles_core.errors import MilesError

HF_LAYER = "model.layers.{}."
EXPERTS = "mlp.experts.experts."  # megatron's prefix of routed-expert tensors, inside a layer
MTP_LAYER = "transformer_layer."


@dataclass(frozen=True, order=True)
class Slot:
    """One megatron-core tensor: scope '' (model-wide), 'decoder' or 'mtp', with its layer and
    routed-expert index (-1 when not applicable) and its name inside the scope."""

    scope: str
    layer: int
    expert: int
    name: str

    def describe(self) -> str:
        where = {"": "", "decoder": f"decoder layer {self.layer} ", "mtp": f"mtp layer {self.layer} "}
        expert = f"expert {self.expert} " if self.expert >= 0 else ""
        return f"{where[self.scope]}{expert}{self.name}"


@dataclass(frozen=True)
class Link:
    """A megatron slot, the HF tensors it is made of (in transform order) and the transform."""

    slot: Slot
    hf_names: tuple[str, ...]
    transform: str


@dataclass(frozen=True)
class BlockMap:
    """The key map of one scope: HF name -> megatron name (None = drop), fused megatron names ->
    transform, local-spec megatron name -> canonical (Transformer Engine layout) name."""

    keys: Mapping[str, str | None]
    fused: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)

    def __or__(self, other: BlockMap) -> BlockMap:
        return BlockMap({**self.keys, **other.keys}, {**self.fused, **other.fused},
                        {**self.aliases, **other.aliases})


@dataclass(frozen=True)
class Heads:
    """Attention shapes the `qkv` transform needs."""

    num_heads: int
    num_query_groups: int
    head_dim: int


@dataclass(frozen=True)
class Family:
    """A family's declarations: key maps per scope plus config translation both ways."""

    model_types: tuple[str, ...]
    layer_map: Callable[[dict[str, Any], int], BlockMap]
    """Key map of HF layer i (attention + MLP); MTP layers use index num_layers + k."""
    num_experts: Callable[[dict[str, Any], int], int]
    """Routed experts in HF layer i (0: dense MLP)."""
    megatron_args: Callable[[dict[str, Any]], dict[str, Any]]
    """Megatron training arguments (as `common.pt` stores them) for a HF config."""
    hf_config: Callable[[dict[str, Any], str], dict[str, Any]]
    """A HF config rebuilt from megatron arguments, for checkpoints that carry no HF config."""
    heads: Callable[[dict[str, Any]], Heads | None] = lambda cfg: None
    expert_map: BlockMap = field(default_factory=lambda: EXPERT_MAP)


GLOBAL_MAP = BlockMap({
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
})
EXPERT_MAP = BlockMap(
    {"gate_proj.weight": "linear_fc1.weight", "up_proj.weight": "linear_fc1.weight",
     "down_proj.weight": "linear_fc2.weight"},
    fused={"linear_fc1.weight": "gate_up"},
)
MTP_MAP = BlockMap({
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",  # both cat(embedding, hidden) on the input side
    "shared_head.norm.weight": "final_layernorm.weight",
    "embed_tokens.weight": None,
    "shared_head.head.weight": None,
})
# HF repeats the shared embedding and output head in every MTP layer; megatron uses the model's
# own. Dropped on import, written back from these slots on export.
MTP_SHARED = {"embed_tokens.weight": "embedding.word_embeddings.weight",
              "shared_head.head.weight": "output_layer.weight"}

# Modules megatron-core gives an `_extra_state` object (Transformer Engine FP8 metadata; None
# for local modules); a checkpoint must carry one per module for megatron-core to load it.
LINEAR_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "linear_q_proj",
                  "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj",
                  "linear_kv_up_proj", "eh_proj", "output_layer")


@dataclass(frozen=True)
class Plan:
    """Every megatron slot of one model with its HF sources, and what the HF side drops."""

    links: tuple[Link, ...]
    dropped: frozenset[str]
    shared: tuple[tuple[str, Slot], ...]
    num_layers: int
    mtp_num_layers: int
    num_experts: Mapping[tuple[str, int], int]
    stacked: bool
    aliases: Mapping[tuple[str, int], Mapping[str, str]]
    heads: Heads | None

    def hf_names(self) -> set[str]:
        return {n for link in self.links for n in link.hf_names} | {n for n, _ in self.shared}

    def canonical(self, slot: Slot) -> Slot:
        """`slot` with a local-spec megatron name replaced by its canonical name."""
        name = self.aliases.get((slot.scope, slot.layer), {}).get(slot.name, slot.name)
        return Slot(slot.scope, slot.layer, slot.expert, name)


def plan(family: Family, cfg: dict[str, Any], mtp_num_layers: int) -> Plan:
    """Expand the family's maps for `cfg` with `mtp_num_layers` MTP layers."""
    num_layers = int(cfg["num_hidden_layers"])
    links: list[Link] = []
    dropped: set[str] = set()
    shared: list[tuple[str, Slot]] = []
    experts: dict[tuple[str, int], int] = {}
    aliases: dict[tuple[str, int], Mapping[str, str]] = {}
    glob = _global_map(cfg)
    _expand(glob, "", Slot("", -1, -1, ""), links, dropped)
    for i in range(num_layers):
        block = family.layer_map(cfg, i)
        _layer(family, cfg, i, block, Slot("decoder", i, -1, ""), "", links, dropped, experts)
        aliases[("decoder", i)] = block.aliases
    for k in range(mtp_num_layers):
        hf_index = num_layers + k
        block = family.layer_map(cfg, hf_index)
        base = Slot("mtp", k, -1, "")
        _expand(MTP_MAP, HF_LAYER.format(hf_index), base, links, dropped)
        _layer(family, cfg, hf_index, block, base, MTP_LAYER, links, dropped, experts)
        aliases[("mtp", k)] = {MTP_LAYER + a: MTP_LAYER + c for a, c in block.aliases.items()}
        for hf, mcore in MTP_SHARED.items():
            if glob.keys["lm_head.weight"] is None and mcore == "output_layer.weight":
                mcore = "embedding.word_embeddings.weight"  # tied: the embedding is the head
            shared.append((HF_LAYER.format(hf_index) + hf, Slot("", -1, -1, mcore)))
    signatures = {_signature(links, i) for i in range(num_layers)}
    return Plan(tuple(links), frozenset(dropped), tuple(shared), num_layers, mtp_num_layers,
                experts, len(signatures) <= 1, aliases, family.heads(cfg))


def _global_map(cfg: dict[str, Any]) -> BlockMap:
    if cfg.get("tie_word_embeddings", False):
        return BlockMap({**GLOBAL_MAP.keys, "lm_head.weight": None})
    return GLOBAL_MAP


def _layer(family: Family, cfg: dict[str, Any], hf_index: int, block: BlockMap, base: Slot,
           mcore_prefix: str, links: list[Link], dropped: set[str],
           experts: dict[tuple[str, int], int]) -> None:
    hf_prefix = HF_LAYER.format(hf_index)
    _expand(block, hf_prefix, base, links, dropped, mcore_prefix)
    num_experts = family.num_experts(cfg, hf_index)
    experts[(base.scope, base.layer)] = num_experts
    for e in range(num_experts):
        expert = Slot(base.scope, base.layer, e, "")
        _expand(family.expert_map, f"{hf_prefix}mlp.experts.{e}.", expert, links, dropped,
                mcore_prefix + EXPERTS)


def _expand(block: BlockMap, hf_prefix: str, base: Slot, links: list[Link], dropped: set[str],
            mcore_prefix: str = "") -> None:
    """Group the HF names of one scope by megatron name, in key-map order."""
    groups: dict[str, list[str]] = {}
    for hf, mcore in block.keys.items():
        if mcore is None:
            dropped.add(hf_prefix + hf)
        else:
            groups.setdefault(mcore, []).append(hf_prefix + hf)
    for mcore, hf_names in groups.items():
        transform = block.fused.get(mcore, "copy")
        if len(hf_names) != (TRANSFORMS[transform].parts or 1):
            raise ValueError(f"key map error: {mcore} has {len(hf_names)} HF parts for '{transform}'")
        slot = Slot(base.scope, base.layer, base.expert, mcore_prefix + mcore)
        links.append(Link(slot, tuple(hf_names), transform))


def _signature(links: list[Link], layer: int) -> frozenset[tuple[str, int]]:
    return frozenset((link.slot.name, link.slot.expert) for link in links
                     if link.slot.scope == "decoder" and link.slot.layer == layer)


# ---- transforms -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transform:
    parts: int | None  # HF tensors per megatron tensor (None: exactly one)
    fuse: Callable[[list[torch.Tensor], Heads | None, tuple[str, ...]], torch.Tensor]
    split: Callable[[torch.Tensor, Heads | None, str], list[torch.Tensor]]


def _copy_fuse(parts, heads, names):
    return parts[0]


def _copy_split(tensor, heads, name):
    return [tensor]


def _qkv_fuse(parts: list[torch.Tensor], heads: Heads | None, names: tuple[str, ...]) -> torch.Tensor:
    q, k, v = parts
    groups, dim = heads.num_query_groups, heads.head_dim
    expected = [heads.num_heads * dim, groups * dim, groups * dim]
    for name, part, rows in zip(names, parts, expected):
        if part.shape[0] != rows or part.shape[1:] != q.shape[1:]:
            raise MilesError(f"shape mismatch for '{name}': the config implies "
                             f"({rows}, {', '.join(map(str, q.shape[1:]))}), the checkpoint has {tuple(part.shape)}")
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(groups, -1, *rest), k.reshape(groups, dim, *rest),
                       v.reshape(groups, dim, *rest)], dim=1)  # (G, (H/G + 2) * D, *rest)
    return fused.reshape(-1, *rest)


def _qkv_split(tensor: torch.Tensor, heads: Heads | None, name: str) -> list[torch.Tensor]:
    groups, dim = heads.num_query_groups, heads.head_dim
    per_group = heads.num_heads // groups * dim
    if tensor.shape[0] != groups * (per_group + 2 * dim):
        raise MilesError(f"shape mismatch for '{name}': the config implies "
                         f"{groups * (per_group + 2 * dim)} rows, the checkpoint has {tuple(tensor.shape)}")
    rest = tensor.shape[1:]
    q, k, v = tensor.reshape(groups, -1, *rest).split([per_group, dim, dim], dim=1)
    return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


def _gate_up_fuse(parts: list[torch.Tensor], heads: Heads | None, names: tuple[str, ...]) -> torch.Tensor:
    gate, up = parts
    if gate.shape != up.shape:
        raise MilesError(f"shape mismatch: '{names[0]}' is {tuple(gate.shape)} but '{names[1]}' is {tuple(up.shape)}")
    return torch.cat([gate, up], dim=0)


def _gate_up_split(tensor: torch.Tensor, heads: Heads | None, name: str) -> list[torch.Tensor]:
    if tensor.shape[0] % 2:
        raise MilesError(f"shape mismatch for '{name}': {tuple(tensor.shape)} has an odd number of rows, "
                         "expected cat(gate, up)")
    return list(tensor.chunk(2, dim=0))


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform(None, _copy_fuse, _copy_split),
    "qkv": Transform(3, _qkv_fuse, _qkv_split),
    "gate_up": Transform(2, _gate_up_fuse, _gate_up_split),
}


# ---- config translation shared by the families -----------------------------------------------

def rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def common_megatron_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """Arguments every GPT-style family shares (names as megatron's argument parser has them)."""
    tied = bool(cfg.get("tie_word_embeddings", False))
    return {
        "num_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
        "ffn_hidden_size": cfg["intermediate_size"], "num_attention_heads": cfg["num_attention_heads"],
        "max_position_embeddings": cfg.get("max_position_embeddings", 4096),
        "seq_length": cfg.get("max_position_embeddings", 4096),
        "padded_vocab_size": cfg["vocab_size"], "norm_epsilon": cfg.get("rms_norm_eps", 1e-6),
        "normalization": "RMSNorm", "swiglu": True, "add_bias_linear": False,
        "position_embedding_type": "rope", "use_rotary_position_embeddings": True,
        "add_position_embedding": False, "rotary_base": rope_theta(cfg), "rotary_percent": 1.0,
        "rotary_interleaved": False, "untie_embeddings_and_output_weights": not tied,
        "apply_layernorm_1p": False, "attention_dropout": 0.0, "hidden_dropout": 0.0,
        "ckpt_format": "torch_dist", "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1,
    }


def common_hf_config(args: dict[str, Any], model_type: str, architecture: str) -> dict[str, Any]:
    """The HF fields `common_megatron_args` came from; missing arguments raise MilesError."""
    need(args, "num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
    return {
        "architectures": [architecture], "model_type": model_type,
        "num_hidden_layers": args["num_layers"], "hidden_size": args["hidden_size"],
        "intermediate_size": args.get("ffn_hidden_size"), "num_attention_heads": args["num_attention_heads"],
        "vocab_size": args["padded_vocab_size"],
        "max_position_embeddings": args.get("max_position_embeddings") or 4096,
        "rms_norm_eps": args.get("norm_epsilon", 1e-5), "rope_theta": args.get("rotary_base", 10000.0),
        "tie_word_embeddings": not args.get("untie_embeddings_and_output_weights", False),
        "hidden_act": "silu",
    }


def need(args: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if args.get(n) is None]
    if missing:
        raise MilesError(f"the checkpoint's megatron arguments lack {', '.join(missing)}; "
                         "cannot rebuild a HF config")
