"""Flattened buckets: a bucket of tensors as one byte tensor, SGLang's `load_format =
"flattened_bucket"` of `/update_weights_from_distributed`, so a bucket is one broadcast; and the
reused byte buffers both ends pack into and unpack from (the CUDA IPC sender packs with them too,
each tensor 256-byte aligned).

The layout is SGLang's (`FlattenedTensorBucket`): each tensor's bytes, row-major, one after the
other in the order of the request's names, no padding; the receiver knows every offset from the
dtypes and shapes it was sent. One broadcast of a 512 MiB bucket runs at the link's bandwidth,
where ~300 per-tensor broadcasts at 0.6B spend most of their time in per-call overhead.

Host time: a sync sends the same buckets push after push, so both ends keep, per bucket
signature (every tensor's dtype and shape), the offsets and the views of their buffer typed and
shaped as each tensor. A pack is then one batched copy (`kernels.batched_copy`: one launch on
CUDA) from the tensors as they are into those views, and an unpack hands out the same views
again: of ~2000 small torch ops a bucket (5 of the 24 ms of a 0.6B CUDA IPC push on an H100) only
the signature's tuple is left. The views are of one buffer; a new buffer (grown, or on another
device) starts the cache afresh.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from miles_core.kernels.batched_copy import BatchedCopier
from miles_core.utils.layout import aligned_offsets

LOAD_FORMAT = "flattened_bucket"
MAX_LAYOUTS = 64
"""Bucket signatures whose views a buffer keeps (a 4B model sends ~10 buckets a push)."""


def byte_sizes(dtypes: list[torch.dtype], shapes: list[list[int]]) -> list[int]:
    """Bytes of each tensor of the bucket."""
    return [math.prod(shape) * dtype.itemsize for dtype, shape in zip(dtypes, shapes)]


def signature(tensors: list[torch.Tensor]) -> tuple:
    """What a bucket's layout depends on: every tensor's dtype and shape, in order."""
    return tuple([(t.dtype, t.shape) for t in tensors])


@dataclass
class Layout:
    """A bucket signature laid out in a byte buffer."""

    offsets: list[int]
    nbytes: int
    views: list[torch.Tensor]
    """Per tensor: the buffer's bytes viewed as its dtype and shape, or (offset not a multiple of
    its dtype's size, which a dtype view refuses) the raw byte slice."""
    unaligned: list[int]
    """Indices of the tensors whose view is a raw byte slice."""


class LayoutCache:
    """Layouts of buckets in one buffer, the last `MAX_LAYOUTS` signatures used."""

    def __init__(self, align: int = 1) -> None:
        self.align = align
        self._buffer: torch.Tensor | None = None
        self._layouts: OrderedDict[tuple, Layout] = OrderedDict()

    def get(self, key: tuple, dtypes: list[torch.dtype], shapes: list, buffer_for) -> tuple[torch.Tensor, Layout]:
        """The buffer and the layout of the bucket with signature `key`. `buffer_for(nbytes)`
        gives a buffer at least `nbytes` long (the same one while it fits)."""
        layout = self._layouts.get(key)
        if layout is not None:
            buffer = buffer_for(layout.nbytes)
            if buffer is self._buffer:
                self._layouts.move_to_end(key)
                return buffer, layout
        offsets, nbytes = aligned_offsets(byte_sizes(dtypes, shapes), self.align)
        buffer = buffer_for(nbytes)
        if buffer is not self._buffer:  # views of an old buffer are stale
            self._layouts.clear()
            self._buffer = buffer
        layout = _layout(buffer, offsets, nbytes, dtypes, shapes)
        self._layouts[key] = layout
        if len(self._layouts) > MAX_LAYOUTS:
            self._layouts.popitem(last=False)
        return buffer, layout


def _layout(buffer: torch.Tensor, offsets: list[int], nbytes: int, dtypes, shapes) -> Layout:
    views, unaligned = [], []
    for index, (offset, dtype, shape) in enumerate(zip(offsets, dtypes, shapes)):
        piece = buffer[offset:offset + math.prod(shape) * dtype.itemsize]
        if piece.storage_offset() % dtype.itemsize:
            views.append(piece)
            unaligned.append(index)
        else:
            views.append(piece.view(dtype).view(shape))
    return Layout(offsets, nbytes, views, unaligned)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


class FlatStaging:
    """A byte buffer reused bucket after bucket, grown only when a bucket is larger; `pack` copies
    a bucket into it in one multi-tensor copy. The NCCL sender reuses it once `WeightGroup.broadcast`
    has waited on its work, which orders the compute stream (where the next bucket is packed) after
    the broadcast (NCCL), or blocks (gloo); the CUDA IPC sender once every server has answered."""

    def __init__(self, device: torch.device, *, align: int = 1, min_bytes: int = 0) -> None:
        self.device = device
        self.min_bytes = min_bytes
        self.buffer = torch.empty(0, dtype=torch.uint8, device=device)
        self.layouts = LayoutCache(align)
        self.copier = BatchedCopier()

    def pack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One byte tensor holding `tensors` in the layout (a view of the staging buffer)."""
        return self.pack_with_offsets(tensors)[0]

    def pack_with_offsets(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """`pack`, and the byte offset of each tensor in it."""
        key = signature(tensors)
        buffer, layout = self.layouts.get(key, [t.dtype for t in tensors], [t.shape for t in tensors], self._fit)
        sources = list(tensors)
        for index in layout.unaligned:
            sources[index] = as_bytes(tensors[index])
        with torch.no_grad():  # parameters require grad; the copy is no part of any graph
            self.copier.copy(layout.views, sources, (key, buffer.data_ptr()))  # one launch on CUDA
        return buffer[:layout.nbytes], layout.offsets

    def _fit(self, nbytes: int) -> torch.Tensor:
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(nbytes, self.min_bytes), dtype=torch.uint8, device=self.device)
        return self.buffer

    def move_to(self, device: torch.device) -> None:
        """Pack on `device` from now on (a fresh buffer there)."""
        if device != self.device:
            self.device = device
            self.buffer = torch.empty(0, dtype=torch.uint8, device=device)


class FlatReceiver:
    """The receiving end: one byte buffer reused bucket after bucket (grown only when a bucket is
    larger) and, per signature, the tensors viewed in it. Reuse is safe because the server takes
    buckets one at a time and the engine copies a bucket out before the next is received."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffer = torch.empty(0, dtype=torch.uint8, device=device)
        self.layouts = LayoutCache()

    def buffer_for(self, dtypes: list[torch.dtype], shapes: list[list[int]]) -> tuple[torch.Tensor, Layout]:
        """The bytes to receive the bucket into, and its layout there."""
        key = (tuple(dtypes), tuple(map(tuple, shapes)))
        buffer, layout = self.layouts.get(key, dtypes, shapes, self._fit)
        return buffer[:layout.nbytes], layout

    def _fit(self, nbytes: int) -> torch.Tensor:
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self.buffer


def unflatten_views(layout: Layout, dtypes: list[torch.dtype], shapes: list[list[int]]) -> list[torch.Tensor]:
    """The tensors of a received bucket: the layout's views, copies for unaligned tensors."""
    tensors = list(layout.views)
    for index in layout.unaligned:
        tensor = torch.empty(shapes[index], dtype=dtypes[index], device=tensors[index].device)
        tensor.reshape(-1).view(torch.uint8).copy_(tensors[index])
        tensors[index] = tensor
    return tensors


def unflatten(flat: torch.Tensor, dtypes: list[torch.dtype], shapes: list[list[int]]) -> list[torch.Tensor]:
    """The tensors of a flat bucket: views where a tensor's offset suits its dtype's alignment,
    else a copy (a 1-byte tensor of odd size shifts every later one)."""
    offsets, nbytes = aligned_offsets(byte_sizes(dtypes, shapes), 1)
    return unflatten_views(_layout(flat, offsets, nbytes, dtypes, shapes), dtypes, shapes)
