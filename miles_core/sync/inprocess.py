"""In-process weight sync: the engine lives in the trainer's process and copies the tensors."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from miles_core.config import SyncConfig
from miles_core.engine.protocol import RolloutEngine
from miles_core.sync.protocol import SyncStats, send_buckets


class InProcessSync:
    """`WeightSync` to an engine object of this process: bucket by bucket, paused meanwhile.

    Each bucket is checked (names, shapes) by the engine before any of it is written; the version
    is stamped with every bucket, and the engine answers no request until the last one is in.
    """

    def __init__(self, engine: RolloutEngine, cfg: SyncConfig) -> None:
        self.engine, self.cfg = engine, cfg

    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncStats:
        start = time.perf_counter()
        self.engine.pause()
        try:
            counts = send_buckets(weights, self.cfg.bucket_mb << 20,
                                  lambda bucket, last: self.engine.update_weights(bucket, version=version))
            self.engine.flush_cache()  # cached prefixes were computed with the old weights
        finally:
            self.engine.resume()
        return SyncStats(*counts, time.perf_counter() - start)
