"""In-process weight sync: the engine lives in the trainer's process and copies the tensors."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from miles_core.config import SyncConfig
from miles_core.engine.protocol import RolloutEngine
from miles_core.sync.protocol import SyncStats, buckets


class InProcessSync:
    """`WeightSync` to an engine object of this process: bucket by bucket, paused meanwhile.

    Each bucket is checked (names, shapes) by the engine before any of it is written; the version
    is stamped with every bucket, and the engine answers no request until the last one is in.
    """

    def __init__(self, engine: RolloutEngine, cfg: SyncConfig) -> None:
        self.engine, self.cfg = engine, cfg

    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncStats:
        start = time.perf_counter()
        num_tensors = num_buckets = num_bytes = 0
        self.engine.pause()
        try:
            for bucket in buckets(weights, self.cfg.bucket_mb << 20):
                self.engine.update_weights(bucket, version=version)
                num_buckets += 1
                num_tensors += len(bucket)
                num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            self.engine.flush_cache()  # cached prefixes were computed with the old weights
        finally:
            self.engine.resume()
        return SyncStats(num_tensors, num_buckets, num_bytes, time.perf_counter() - start)
