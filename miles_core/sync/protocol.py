"""The `WeightSync` protocol: how the trainer's weights reach the rollout engine after a step.

`push` takes `TrainBackend.export_weights()` (HF-named tensors) and the new weight version, and
returns when every engine serves the new weights under that version. Transports differ in how
tensors travel (in-process copy now; disk, CUDA IPC, NCCL later) but share the bucketing and the
pause -> update -> flush -> continue sequence, so no request is answered by half-updated weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from miles_core.quant.formats import COMPANION_SUFFIXES

Named = tuple[str, torch.Tensor]
"""An HF-named tensor, as the trainer exports it."""


@dataclass
class SyncStats:
    num_tensors: int
    num_buckets: int
    num_bytes: int
    seconds: float


@dataclass
class SyncContext:
    """What transports that write checkpoints need besides the engine: the model's HF config,
    the folder its tokenizer files come from, a folder of the run to write into, and the module
    globs `sync.quantize` is limited to (`train.qat_modules` under QAT; empty: every Linear)."""

    hf_config: dict[str, Any] = field(default_factory=dict)
    source_dir: Path | None = None
    work_dir: Path | None = None
    quantize_include: tuple[str, ...] = ()


class WeightSync(Protocol):
    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncStats:
        """Deliver `weights` to the engine(s) and stamp `version`; raise on any failure."""


def buckets(weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of named tensors of at most `bucket_bytes` each (a larger tensor goes
    alone), in the order given. A bucket never starts with a quantised weight's companion (its
    scales, its shape), so a receiver can dequantise bucket by bucket."""
    for bucket, _ in sized_buckets(weights, bucket_bytes):
        yield bucket


def sized_buckets(weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                  ) -> Iterator[tuple[list[tuple[str, torch.Tensor]], int]]:
    """`buckets`, each with its bytes (counted once: ~300 tensors a push at 0.6B)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in weights:
        nbytes = tensor.nbytes
        if bucket and size + nbytes > bucket_bytes and not name.endswith(COMPANION_SUFFIXES):
            yield bucket, size
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket, size


def with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """Each item with whether it is the last one."""
    iterator = iter(items)
    previous = next(iterator, _END)
    for item in iterator:
        yield previous, False
        previous = item
    if previous is not _END:
        yield previous, True


_END = object()


def send_paused(engine, weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                send: Callable[[list[tuple[str, torch.Tensor]], bool, bool], None]) -> tuple[int, int, int]:
    """`send(bucket, is_last, alone)` for each bucket of `weights`, so that no request sees half the
    new weights: a push of one bucket goes `alone`, as one call that aborts the servers' running
    requests and holds new ones while it updates (SGLang's `abort_all_requests`), a push of several
    with the engine paused around them (two more round trips). Returns (tensors, buckets, bytes)."""
    sent = with_last(sized_buckets(weights, bucket_bytes))
    first = next(sent, None)
    if first is None:
        return 0, 0, 0
    if first[1]:
        (bucket, size), _ = first
        send(bucket, True, True)
        return len(bucket), 1, size
    num_tensors = num_buckets = num_bytes = 0
    engine.pause()
    try:
        for (bucket, size), last in itertools.chain([first], sent):
            send(bucket, last, False)
            num_buckets += 1
            num_tensors += len(bucket)
            num_bytes += size
    finally:
        engine.resume()
    return num_tensors, num_buckets, num_bytes
