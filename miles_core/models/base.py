"""`CausalLM`: what every family's `...ForCausalLM` shares.

`forward` returns final hidden states and `lm_head` turns chosen ones into logits: keeping logits
out of `forward` lets the trainer compute log-probs in vocab chunks and the engine compute
logits only for the last token of each sequence. `ops` holds the kernels chosen by
`kernels.set_alignment_mode`, read by the engine's sampler and the trainer's log-prob kernel so
both sides use the same ones. MoE families list their MoE layers in `args.moe_layers`; the i-th
entry is the decoder layer whose routing is key i of a `RoutingContext`.
"""

from __future__ import annotations

import torch
from torch import nn

from miles_core.kernels import FAST_OPS, Ops
from miles_core.models.layers import KVCache, Linear
from miles_core.models.routing import RoutingContext


class CausalLM(nn.Module):
    # HF checkpoints store q/k/v, gate/up and each expert separately, as our modules do.
    packed_modules_mapping: dict[str, list[str]] = {}
    ops: Ops = FAST_OPS

    def __init__(self, args, model: nn.Module) -> None:
        super().__init__()
        self.args = args
        self.model = model
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Decoder layer index of MoE layer i (its `RoutingContext` key) at position i."""
        return tuple(getattr(self.args, "moe_layers", ()))

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def tie_weights(self) -> None:
        """Share the embedding with the output layer when the config ties them (again after
        `to_empty`, which creates new parameter objects)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor,
                kv_cache: KVCache | None = None, routing: RoutingContext | None = None) -> torch.Tensor:
        """Final hidden states (B, T, E). `routing` records or replays the experts of every MoE
        layer (dense families ignore it); use a fresh context per forward call."""
        return self.model(input_ids_BT, position_ids_BT, kv_cache, routing)

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        num_kv_heads, head_dim, v_head_dim = self.kv_cache_dims()
        weight = self.lm_head.weight
        return KVCache(self.args.num_hidden_layers, batch, num_kv_heads, max_len, head_dim, weight.dtype,
                       weight.device, v_head_dim=v_head_dim)

    def kv_cache_dims(self) -> tuple[int, int, int]:
        """(kv heads, key head dim, value head dim) per layer."""
        return self.args.num_key_value_heads, self.args.head_dim, self.args.head_dim


def named_weights(model: nn.Module, *, remove_duplicate: bool = True):
    """(HF name, tensor) of everything a checkpoint holds: parameters, then persistent buffers
    (DeepSeek-V3's `e_score_correction_bias`). Non-persistent buffers (RoPE frequencies) are
    recomputed from the config and left out, as in HF's state dict."""
    yield from model.named_parameters(remove_duplicate=remove_duplicate)
    for module_name, module in model.named_modules(remove_duplicate=remove_duplicate):
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer
