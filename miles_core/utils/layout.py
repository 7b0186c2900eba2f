"""Byte layouts of tensors packed into one buffer: the offsets the weight-sync buckets, the
engine's fixed-address regions and its KV pool all lay their tensors out by."""

from __future__ import annotations

import itertools


def aligned_offsets(sizes: list[int], align: int) -> tuple[list[int], int]:
    """Byte offsets of tensors of `sizes` packed in order, each at a multiple of `align`, and the
    bytes they need (align 1: back to back, SGLang's flat layout)."""
    if align == 1:
        return [0, *itertools.accumulate(sizes)][:-1], sum(sizes)
    offsets, end = [], 0
    for size in sizes:
        offsets.append(-(-end // align) * align)
        end = offsets[-1] + size
    return offsets, end
