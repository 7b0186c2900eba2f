"""Flattened buckets: a bucket of tensors as one byte tensor, SGLang's `load_format =
"flattened_bucket"` of `/update_weights_from_distributed`, so a bucket is one broadcast.

The layout is SGLang's (`FlattenedTensorBucket`): each tensor's bytes, row-major, one after the
other in the order of the request's names, no padding; the receiver knows every offset from the
dtypes and shapes it was sent. One broadcast of a 512 MiB bucket runs at the link's bandwidth,
where ~300 per-tensor broadcasts at 0.6B spend most of their time in per-call overhead.
"""

from __future__ import annotations

import itertools
import math

import torch

LOAD_FORMAT = "flattened_bucket"


def byte_sizes(dtypes: list[torch.dtype], shapes: list[list[int]]) -> list[int]:
    """Bytes of each tensor of the bucket."""
    return [math.prod(shape) * dtype.itemsize for dtype, shape in zip(dtypes, shapes)]


def pack_bytes(buffer: torch.Tensor, offsets: list[int], tensors: list[torch.Tensor]) -> None:
    """Copy each tensor's bytes into the byte tensor `buffer` at its offset, in one multi-tensor
    copy (one launch for a bucket of ~300 tensors, not one each)."""
    sources = [t.detach().to(buffer.device).contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    torch._foreach_copy_([buffer[o:o + s.numel()] for o, s in zip(offsets, sources)], sources)


class FlatStaging:
    """The sender's staging buffer: reused bucket after bucket, grown only when a bucket is larger.
    Reuse is safe because `WeightGroup.broadcast` waits on its work, which orders the compute
    stream (where the next bucket is packed) after the broadcast (NCCL), or blocks (gloo)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffer = torch.empty(0, dtype=torch.uint8, device=device)

    def pack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One byte tensor holding `tensors` back to back (a view of the staging buffer)."""
        sizes = byte_sizes([t.dtype for t in tensors], [list(t.shape) for t in tensors])
        total = sum(sizes)
        if self.buffer.numel() < total:
            self.buffer = torch.empty(total, dtype=torch.uint8, device=self.device)
        offsets = [0, *itertools.accumulate(sizes)][:-1]
        pack_bytes(self.buffer, offsets, tensors)
        return self.buffer[:total]


def unflatten(flat: torch.Tensor, dtypes: list[torch.dtype], shapes: list[list[int]]) -> list[torch.Tensor]:
    """The tensors of a received flat bucket: views where a tensor's offset suits its dtype's
    alignment, else a copy (a 1-byte tensor of odd size shifts every later one)."""
    tensors, offset = [], 0
    for dtype, shape, size in zip(dtypes, shapes, byte_sizes(dtypes, shapes)):
        piece = flat[offset : offset + size]
        if offset % dtype.itemsize == 0:
            tensors.append(piece.view(dtype).view(shape))
        else:
            tensor = torch.empty(shape, dtype=dtype, device=flat.device)
            tensor.reshape(-1).view(torch.uint8).copy_(piece)
            tensors.append(tensor)
        offset += size
    return tensors
