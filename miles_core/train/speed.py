"""Trainer speed options applied to the policy model: activation checkpointing, `torch.compile`
per decoder layer, and bf16 weight casts made once per weight version instead of per micro-batch.

Checkpointing and compilation wrap each decoder layer's `forward` on the instance, so module and
parameter names (what checkpoints and weight sync see) do not change. A checkpointed layer runs
its forward again in backward; two things must not run twice: a KV-cache write (the padded
shared-prompt forward's cache is written in place, so those calls are not checkpointed) and an
R3 replay entry (each must be used once per forward: the recomputation reuses the ids the first
run returned).

Casts: in bf16 compute every micro-batch used to cast all fp32 masters to bf16 again. `CastCache`
keeps one bf16 leaf copy per master for as long as the masters are unchanged (their version
counters, bumped by the optimizer step, `load_state_dict` or any in-place write, are the key),
and after each micro-batch's backward `fold_grads` adds the leaves' bf16 gradients to the
masters' fp32 ones, exactly what autograd's cast backward did (the same upcast and fp32 sum).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.checkpoint import checkpoint

from miles_core.models.layers import KVCache
from miles_core.models.routing import RoutingContext


class _RouteOnce:
    """A `RoutingContext` stand-in for one layer call: the recomputation in backward gets the ids
    of the first call instead of consuming the replay entry again."""

    def __init__(self, ctx: RoutingContext) -> None:
        self.ctx, self.ids = ctx, {}

    def route(self, layer: int, chosen: torch.Tensor) -> torch.Tensor:
        if layer not in self.ids:
            self.ids[layer] = self.ctx.route(layer, chosen)
        return self.ids[layer]


class _CheckpointedForward:
    """Set as a decoder layer's `forward`: the class forward under non-reentrant checkpointing."""

    def __init__(self, layer: nn.Module) -> None:
        # The class's forward, unbound, called with the layer: binding it in `__call__`
        # (`function.__get__`) was a graph break under torch 2.11's dynamo, which traces this call
        # when the layer is compiled too (2.13 traces it).
        self.layer, self.class_forward = layer, type(layer).forward

    def __call__(self, *args):
        if not torch.is_grad_enabled() or any(isinstance(a, KVCache) for a in args):
            return self.class_forward(self.layer, *args)
        args = tuple(_RouteOnce(a) if isinstance(a, RoutingContext) else a for a in args)
        # The weights this call sees (the bf16 casts that `call_in_dtype` swaps in) are inputs of the
        # checkpointed function: the recomputation in backward runs after the swap has ended and
        # must see the same tensors, not the fp32 masters.
        names, weights = zip(*self.layer.named_parameters()) if any(True for _ in self.layer.parameters()) else ((), ())

        def run(*flat):
            with _reparametrize_module(self.layer, dict(zip(names, flat[: len(names)]))):
                return self.class_forward(self.layer, *flat[len(names):])

        return checkpoint(run, *weights, *args, use_reentrant=False)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The main stack's decoder layers (`model.model.layers` in every family)."""
    return model.model.layers


def apply_speed_options(model: nn.Module, *, activation_checkpointing: bool, compile: bool) -> None:
    """Checkpoint and/or compile every decoder layer of `model` in place."""
    if compile:
        _allow_a_graph_per_layer(len(decoder_layers(model)))
    for layer in decoder_layers(model):
        if activation_checkpointing:
            layer.forward = _CheckpointedForward(layer)
        if compile:
            layer.compile()


def _allow_a_graph_per_layer(num_layers: int) -> None:
    # Every layer shares one compiled graph, but dynamo guards on each call's shapes and on the
    # packed rows' (bucketed) longest-segment lengths: a static then a dynamic graph, and one per
    # length bucket. Dynamo's default limit is 8 entries, past which calls silently run eagerly
    # (seen on an H100 when each of the 28 layers of the 0.6B shape compiled its own graphs), so
    # leave room for several per layer.
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 4 * num_layers))


class CastCache:
    """bf16 (or other) copies of a module's fp32 parameters, remade only when the masters change."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._casts: dict[str, torch.Tensor] = {}
        self._masters: dict[str, nn.Parameter] = {}

    def get(self, module: nn.Module, dtype: torch.dtype, keep: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """name -> cast leaf for every parameter not already `dtype` and not kept in fp32."""
        masters = {name: p for name, p in module.named_parameters() if p.dtype != dtype and not name.endswith(keep)}
        key = (dtype, torch.is_grad_enabled(), tuple((id(p), p._version) for p in masters.values()))
        if key != self._key:
            grad = torch.is_grad_enabled()
            self._casts = {name: p.detach().to(dtype).requires_grad_(grad and p.requires_grad)
                           for name, p in masters.items()}
            self._masters, self._key = masters, key
        return self._casts

    def fold_grads(self) -> None:
        """Add the leaves' gradients into the masters' (fp32) and clear them for the next micro-batch."""
        with torch.no_grad():
            for name, leaf in self._casts.items():
                if leaf.grad is None:
                    continue
                master = self._masters[name]
                if master.grad is None:
                    master.grad = leaf.grad.to(master.dtype)
                else:
                    master.grad.add_(leaf.grad)
                leaf.grad = None
