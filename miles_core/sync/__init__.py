"""Weight sync between trainer and rollout engines, behind the `WeightSync` protocol.

`SYNC_TRANSPORTS` maps `sync.transport` to a factory `(engine, SyncConfig, SyncContext) ->
WeightSync`: `inprocess` (copy into an engine of this process), `disk` (a HF checkpoint the
engine or its servers load by path), `nccl` (a broadcast over a weight-update process group, to
every server) and `cuda_ipc` (a `miles serve` server on the same GPU maps the trainer's buffer). `auto` picks `disk`
for engines in other processes (`engine.is_remote`, the sglang backend), else `inprocess`.
`sync.quantize` wraps the transport in `QuantizedSync` (FP8 / INT4 on the way).
"""

from __future__ import annotations

from collections.abc import Callable

from miles_core.config import SyncConfig
from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import MilesError, one_of
from miles_core.quant.formats import QuantSpec
from miles_core.sync.disk import DiskSync
from miles_core.sync.guarded import CheckedSync, TimedSync
from miles_core.sync.cuda_ipc import CudaIpcSync
from miles_core.sync.inprocess import InProcessSync
from miles_core.sync.nccl import NcclSync
from miles_core.sync.protocol import SyncContext, SyncStats, WeightSync, buckets
from miles_core.sync.quantized import QuantizedSync

SyncFactory = Callable[[RolloutEngine, SyncConfig, SyncContext | None], WeightSync]
SYNC_TRANSPORTS: dict[str, SyncFactory] = {
    "inprocess": lambda engine, cfg, context: InProcessSync(engine, cfg),
    "disk": DiskSync,
    "nccl": NcclSync,
    "cuda_ipc": CudaIpcSync,
}


def transport_name(cfg: SyncConfig, engine: RolloutEngine) -> str:
    """`cfg.transport`, with `auto` resolved for this engine."""
    if cfg.transport != "auto":
        return cfg.transport
    return "disk" if getattr(engine, "is_remote", False) else "inprocess"


def build_weight_sync(cfg: SyncConfig, engine: RolloutEngine, context: SyncContext | None = None) -> WeightSync:
    name = transport_name(cfg, engine)
    if name not in SYNC_TRANSPORTS:
        raise one_of("sync.transport", name, tuple(SYNC_TRANSPORTS))
    if name == "inprocess" and getattr(engine, "is_remote", False):
        raise MilesError("sync.transport = 'inprocess' cannot reach an engine in other processes "
                         "(engine.backend = 'sglang'); use 'disk' or 'auto'")
    sync = SYNC_TRANSPORTS[name](engine, cfg, context)
    if cfg.check_weight_update_equal:
        if cfg.quantize != "off" and name == "disk":
            raise MilesError("sync.check_weight_update_equal compares dense tensors; the 'disk' transport with "
                             f"sync.quantize = '{cfg.quantize}' hands the engine quantised ones: turn one off")
        sync = CheckedSync(sync, engine)  # inside the quantiser: it checks what the engine was handed
    if cfg.quantize != "off":
        include = context.quantize_include if context is not None else ()
        spec = QuantSpec(cfg.quantize, cfg.quantize_group_size, include=include)
        route = {"disk": "disk", "inprocess": "local"}.get(name, "remote")
        sync = QuantizedSync(sync, spec, route=route)
    return TimedSync(sync, cfg.timeout_s) if cfg.timeout_s > 0 else sync


__all__ = ["SYNC_TRANSPORTS", "SyncContext", "SyncStats", "WeightSync", "buckets", "build_weight_sync",
           "transport_name"]
