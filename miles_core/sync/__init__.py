"""Weight sync between trainer and rollout engines, behind the `WeightSync` protocol.

`SYNC_TRANSPORTS` maps `sync.transport` to a factory `(engine, SyncConfig) -> WeightSync`;
transports for engines in other processes or on other machines (disk, CUDA IPC, NCCL) register
here.
"""

from __future__ import annotations

from collections.abc import Callable

from miles_core.config import SyncConfig
from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import one_of
from miles_core.sync.inprocess import InProcessSync
from miles_core.sync.protocol import SyncStats, WeightSync, buckets

SYNC_TRANSPORTS: dict[str, Callable[[RolloutEngine, SyncConfig], WeightSync]] = {"inprocess": InProcessSync}


def build_weight_sync(cfg: SyncConfig, engine: RolloutEngine) -> WeightSync:
    if cfg.transport not in SYNC_TRANSPORTS:
        raise one_of("sync.transport", cfg.transport, tuple(SYNC_TRANSPORTS))
    return SYNC_TRANSPORTS[cfg.transport](engine, cfg)


__all__ = ["SYNC_TRANSPORTS", "SyncStats", "WeightSync", "buckets", "build_weight_sync"]
