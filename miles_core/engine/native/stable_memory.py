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
regions; when a weight sync rewrites the weights right after the resume (`keep_weights=False`) it
copies only the bytes no sync writes (`unwritten_spans`: the RoPE frequencies) and drops the
rest. A resume maps them, copies back what was copied out (the same bits) and marks every KV
block as never used, so each is zeroed when first handed out (`KVPool.forget_contents`: fresh
pages hold anything). The graphs' own memory pool and static inputs stay allocated (small next to the pool).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

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


def byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, end) device addresses of the bytes `tensor` reads (its strides, not its storage)."""
    if tensor.numel() == 0:
        return tensor.data_ptr(), tensor.data_ptr()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + extent * tensor.element_size()


def unwritten_spans(tensors: list[torch.Tensor], written: list[torch.Tensor], base: int) -> list[tuple[int, int]]:
    """(offset from `base`, bytes) of each of `tensors` not lying wholly within the bytes of
    `written` (a fused q/k/v weight is covered by its q, k and v), adjacent spans merged."""
    covered = _merged(byte_range(t) for t in written)
    starts = [start for start, _ in covered]

    def uncovered(start: int, end: int) -> bool:
        at = bisect.bisect_right(starts, start) - 1
        return start != end and not (at >= 0 and end <= covered[at][1])

    spans = _merged(r for r in (byte_range(t) for t in tensors) if uncovered(*r))
    return [(start - base, end - start) for start, end in spans]


def _merged(ranges) -> list[list[int]]:
    """[start, end) ranges sorted, overlapping or adjacent ones joined."""
    out: list[list[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


@dataclass
class StableMemory:
    """The regions of one engine and the host copy of its weights while released."""

    weights: object
    """Region holding every weight tensor's storage."""
    weights_bytes: int
    pool: object
    """Region holding the KV pool's K/V tensors."""
    host: torch.Tensor | None = None
    """The whole weights region's bytes while released (kept for the run once made)."""
    kept: tuple[list[tuple[int, int]], torch.Tensor] | None = field(default=None, repr=False)
    """(spans, their bytes) while released with the weights dropped."""

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

    def release(self, kept_spans: list[tuple[int, int]] | None = None) -> int:
        """Weights to the host (or only `kept_spans` of them, (offset, bytes) each: the rest is
        dropped), both regions' pages back to the driver; returns the bytes unmapped."""
        pinned = self.weights.device.type == "cuda"
        if kept_spans is None:
            if self.host is None:
                self.host = torch.empty(self.weights_bytes, dtype=torch.uint8, pin_memory=pinned)
            self.host.copy_(self.weights.tensor[:self.weights_bytes], non_blocking=True)
        else:
            host = torch.empty(sum(n for _, n in kept_spans), dtype=torch.uint8, pin_memory=pinned)
            for (offset, nbytes), start in zip(kept_spans, _starts(kept_spans)):
                host[start:start + nbytes].copy_(self.weights.tensor[offset:offset + nbytes], non_blocking=True)
            self.kept = (kept_spans, host)
        if pinned:
            torch.cuda.synchronize(self.weights.device)  # the copy lands before the pages go
        self.weights.unmap()
        self.pool.unmap()
        return self.weights.nbytes + self.pool.nbytes

    def restore(self, pool: KVPool) -> None:
        """Pages under both regions again, the weights' bits copied back, every KV block unused."""
        self.weights.map()
        self.pool.map()
        if self.kept is None:
            self.weights.tensor[:self.weights_bytes].copy_(self.host, non_blocking=True)
        else:
            spans, host = self.kept
            for (offset, nbytes), start in zip(spans, _starts(spans)):
                self.weights.tensor[offset:offset + nbytes].copy_(host[start:start + nbytes], non_blocking=True)
        pool.forget_contents()
        if self.weights.device.type == "cuda":
            torch.cuda.synchronize(self.weights.device)
        self.kept = None


def _starts(spans: list[tuple[int, int]]) -> list[int]:
    """Where each span's bytes start in one buffer holding them back to back."""
    return aligned_offsets([nbytes for _, nbytes in spans], 1)[0]
