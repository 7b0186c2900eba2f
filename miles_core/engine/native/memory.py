"""Moving the native engine's weights to host memory and back (colocation with the trainer).

While the trainer trains on the engine's GPU, the engine gives the GPU back: the engine drops
its KV pool and CUDA graphs (caches, rebuilt on resume) and moves its weights here. Each weight is
copied into a host tensor, pinned when it lives on CUDA (a pinned copy runs at bus speed and may
be asynchronous), and the parameter's `.data` is pointed at it, so the parameter objects and every
reference to them (tied embeddings share one) stay the same; on resume the copy goes back to the
device bit for bit. Persistent and non-persistent buffers (RoPE frequencies) move with them.

Fused projections (`fuse.py`: q/k/v and gate/up parameters are row views of one fused tensor)
are unfused first: views moved one by one would become separate copies, and the fused tensor
would stay behind on the GPU. They are fused again after the weights are back, which rebuilds the
layout the engine started with (`fuse_projections` is deterministic: a concatenation).

A release may drop the weights instead (`keep_weights=False`, when a weight sync rewrites them
right after the resume, as every colocated step does): each parameter and persistent buffer
becomes a host placeholder of its shape (one element, expanded: no copy, no host memory) and
comes back as fresh, unwritten device memory; only the non-persistent buffers, which no sync
carries, are copied.

On a CPU engine the same copies happen (host to host; nothing is freed) so that one code path
runs everywhere and CPU tests cover it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from miles_core.engine.native.fuse import fuse_projections
from miles_core.models.layers import Attention, GatedMLP


@dataclass
class HostWeights:
    """What `weights_to_host` moved: where the weights came from, and whether they were fused."""

    device: torch.device
    fused: bool
    num_bytes: int
    """Bytes copied to host memory."""
    dropped_bytes: int = 0
    """Bytes dropped (`keep_weights=False`): they come back unwritten."""
    dropped: frozenset = frozenset()
    """(id of the holder, buffer name or None) of each tensor dropped."""


def weights_to_host(model: nn.Module, keep_weights: bool = True) -> HostWeights:
    """Move every parameter and buffer of `model` to host memory (pinned when on CUDA); with
    `keep_weights=False` only the non-persistent buffers, the rest dropped (module docstring)."""
    device = model.lm_head.weight.device
    fused = _unfuse(model)
    num_bytes = dropped_bytes = 0
    dropped = set()
    with torch.no_grad():
        for holder, name, tensor in _tensors(model):
            nbytes = tensor.numel() * tensor.element_size()
            if not keep_weights and _is_weight(holder, name):
                _set(holder, name, torch.zeros((), dtype=tensor.dtype).expand(tensor.shape))
                dropped.add((id(holder), name))
                dropped_bytes += nbytes
                continue
            host = torch.empty_like(tensor, device="cpu", pin_memory=tensor.is_cuda)
            host.copy_(tensor, non_blocking=tensor.is_cuda)
            _set(holder, name, host)
            num_bytes += nbytes
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the copies must land before the GPU memory is reused
    return HostWeights(device, fused, num_bytes, dropped_bytes, frozenset(dropped))


def weights_to_device(model: nn.Module, moved: HostWeights) -> None:
    """Undo `weights_to_host`: the same bits back on `moved.device` (dropped tensors as fresh,
    unwritten memory), fused again if they were."""
    with torch.no_grad():
        for holder, name, tensor in _tensors(model):
            if (id(holder), name) in moved.dropped:
                _set(holder, name, torch.empty(tensor.shape, dtype=tensor.dtype, device=moved.device))
            else:
                _set(holder, name, tensor.to(moved.device, non_blocking=tensor.is_pinned()))
    if moved.device.type == "cuda":
        torch.cuda.synchronize(moved.device)
    if moved.fused:
        fuse_projections(model)


def device_allocated(device: torch.device) -> int:
    """Bytes the CUDA caching allocator has handed to tensors on `device`; 0 off CUDA."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def free_cached(device: torch.device) -> None:
    """Give the allocator's cached blocks back to the driver, so another process (or the trainer's
    own allocator pool) can use them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _unfuse(model: nn.Module) -> bool:
    """Drop the fused tensors (their views, the parameters, stay); whether any was fused."""
    fused = False
    for module in model.modules():
        if isinstance(module, Attention) and module.fused_qkv is not None:
            module.fused_qkv, fused = None, True
        elif isinstance(module, GatedMLP) and module.fused_gate_up is not None:
            module.fused_gate_up, fused = None, True
    return fused


def _tensors(model: nn.Module):
    """(holder, name, tensor): each parameter once (tied ones share an object), then every buffer."""
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                yield param, None, param.data
        for name, buffer in module._buffers.items():
            if buffer is not None:
                yield module, name, buffer


def _is_weight(holder, name: str | None) -> bool:
    """Whether a `_tensors` entry is one a weight sync writes: a parameter or a persistent buffer
    (what `models.base.named_weights` yields)."""
    return name is None or name not in holder._non_persistent_buffers_set


def _set(holder, name: str | None, tensor: torch.Tensor) -> None:
    if name is None:
        holder.data = tensor  # a parameter: same object, new storage
    else:
        holder._buffers[name] = tensor
