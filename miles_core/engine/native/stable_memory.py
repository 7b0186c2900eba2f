"""Colocated release that keeps every address: the engine's weights and KV pool live in
fixed-address regions (`utils/cuda_vmm.Region`), so a release unmaps their pages and a resume maps
them again, and the CUDA graphs captured over them stay valid (`engine.stable_memory`, CUDA).

Without it a release freed the pool and the weights through the caching allocator and a resume
allocated them at new addresses, which forced a capture of every decode graph on every resume:
about 4 of the 7 s of a colocated 0.6B RL step on an H100 (`bench/results/multi_gpu_step.md`).

The move into the regions happens once, at the first release (runs that never release pay
nothing), in an order that never holds two KV pools: the weights first (each storage copied
into the weights region at a 256-byte aligned offset, then every tensor over it, parameters,
buffers and the fused q/k/v and gate/up tensors alike, re-pointed with `Tensor.set_`, so the
parameter objects and every view relationship stay), the old storages freed, then the old pool
freed and the pool's K/V laid out as views of the pool region. The graphs captured before the
move are dropped and captured once more at the next resume; after that, never.

A release copies the weights region to one pinned host buffer (kept for the run) and unmaps both
regions; a resume maps them, copies the weights back (the same bits) and marks every KV block as
never used, so each is zeroed when first handed out (`KVPool.forget_contents`: fresh pages hold
anything). The graphs' own memory pool and static inputs stay allocated (small next to the pool).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from miles_core.engine.native.kv_pool import KVPool
from miles_core.engine.native.memory import free_cached
from miles_core.utils.layout import aligned_offsets

ALIGN = 256


def supported(device: torch.device) -> bool:
    """Whether fixed-address regions exist on `device` (CUDA's virtual memory management)."""
    return device.type == "cuda"


def new_region(nbytes: int, device: torch.device):
    """A mapped fixed-address region of at least `nbytes` on `device` (`cuda_vmm.Region`)."""
    from miles_core.utils.cuda_vmm import Region

    return Region(nbytes, device)


def model_tensors(model: nn.Module, device: torch.device) -> list[torch.Tensor]:
    """Every distinct tensor object of `model` on `device` that holds memory: parameters, buffers,
    and tensors kept as plain attributes (the fused projections, held in tuples)."""
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        values = [*module._parameters.values(), *module._buffers.values()]
        for value in vars(module).values():
            values += value if isinstance(value, (tuple, list)) else [value]
        for value in values:
            if (isinstance(value, torch.Tensor) and value.device == device
                    and value.untyped_storage().nbytes() > 0):
                found.setdefault(id(value), value)
    return list(found.values())


def storage_layout(tensors: list[torch.Tensor]) -> tuple[list[tuple[torch.UntypedStorage, int, list[torch.Tensor]]], int]:
    """(storage, byte offset in the region, tensors over it) per distinct storage, and the bytes
    the region needs."""
    groups: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        groups.setdefault(storage.data_ptr(), (storage, []))[1].append(tensor)
    offsets, end = aligned_offsets([storage.nbytes() for storage, _ in groups.values()], ALIGN)
    return [(storage, start, members) for (storage, members), start in zip(groups.values(), offsets)], end


def relocate(layout, region: torch.Tensor) -> None:
    """Copy each storage's bytes into the uint8 `region` at its offset and re-point its tensors."""
    target = region.untyped_storage()
    with torch.no_grad():
        for storage, start, members in layout:
            source = torch.empty(0, dtype=torch.uint8, device=region.device).set_(storage)
            region[start:start + source.numel()].copy_(source)
            for tensor in members:
                offset = start // tensor.element_size() + tensor.storage_offset()
                tensor.set_(target, offset, tensor.size(), tensor.stride())


@dataclass
class StableMemory:
    """The regions of one engine and the host copy of its weights while released."""

    weights: object
    """Region holding every weight tensor's storage."""
    weights_bytes: int
    pool: object
    """Region holding the KV pool's K/V tensors."""
    host: torch.Tensor | None = None

    @classmethod
    def adopt(cls, model: nn.Module, pool: KVPool, device: torch.device,
              make_region: Callable[[int, torch.device], object] | None = None) -> StableMemory:
        """Move `model`'s tensors and `pool`'s K/V into new regions (order: module docstring).
        A failure before the weights move changes nothing; one after (no room for the pool's
        region) leaves the weights in their region and the pool allocated as before."""
        make_region = make_region or new_region
        layout, weights_bytes = storage_layout(model_tensors(model, device))
        weights = make_region(weights_bytes, device)
        relocate(layout, weights.tensor)
        del layout  # the old storages go with their last reference
        pool.release()
        free_cached(device)
        try:
            pool_region = make_region(pool.bytes_needed(ALIGN), device)
        except Exception:
            pool.restore()
            raise
        pool.place(pool_region.tensor, ALIGN)
        return cls(weights, weights_bytes, pool_region)

    @property
    def pool_bytes(self) -> int:
        return self.pool.nbytes

    def release(self) -> int:
        """Weights to the host, both regions' pages back to the driver; returns the bytes unmapped."""
        if self.host is None:
            self.host = torch.empty(self.weights_bytes, dtype=torch.uint8, pin_memory=self.weights.device.type == "cuda")
        self.host.copy_(self.weights.tensor[:self.weights_bytes], non_blocking=True)
        if self.weights.device.type == "cuda":
            torch.cuda.synchronize(self.weights.device)  # the copy lands before the pages go
        self.weights.unmap()
        self.pool.unmap()
        return self.weights.nbytes + self.pool.nbytes

    def restore(self, pool: KVPool) -> None:
        """Pages under both regions again, the weights' bits copied back, every KV block unused."""
        self.weights.map()
        self.pool.map()
        self.weights.tensor[:self.weights_bytes].copy_(self.host, non_blocking=True)
        pool.forget_contents()
        if self.weights.device.type == "cuda":
            torch.cuda.synchronize(self.weights.device)
