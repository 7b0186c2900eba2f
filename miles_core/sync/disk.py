"""Disk weight sync: the trainer writes a HF checkpoint, the engine loads it by path.

`sync.transport = "disk"` (and `auto` for engines in other processes): each push writes the
exported weights with `checkpoint/hf.py` into `<disk_dir>/v<version>` (atomically, with the
config and tokenizer files, so SGLang can load it too), then asks the engine to load that folder
(`update_weights_from_disk(path, version)`: SGLang's `/update_weights_from_disk` on every server,
which pauses, loads, flushes and checks the version). An engine without that method (the native
one) gets the tensors read back from the folder. The previous version's folder is removed once
the new one is loaded, so the folder holds one checkpoint between steps.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from miles_core.checkpoint.hf import iter_dense_state_dict, save_hf_checkpoint
from miles_core.config import SyncConfig
from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import MilesError
from miles_core.sync.protocol import SyncContext, SyncStats


class DiskSync:
    """`WeightSync` through a HF checkpoint folder that the engine (or its servers) can read."""

    def __init__(self, engine: RolloutEngine, cfg: SyncConfig, context: SyncContext | None) -> None:
        if context is None or context.work_dir is None:
            raise MilesError("sync.transport = 'disk' needs a folder: set sync.disk_dir (or run inside a run folder)")
        self.engine, self.cfg, self.context = engine, cfg, context
        self.folder = Path(cfg.disk_dir) if cfg.disk_dir else context.work_dir
        self._previous: Path | None = None

    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncStats:
        start = time.perf_counter()
        counted = _Counter(weights)
        path = (self.folder / f"v{version}").resolve()
        save_hf_checkpoint(path, counted, self.context.hf_config, source_dir=self.context.source_dir)
        self._load(path, version)
        if self._previous is not None and self._previous != path:
            shutil.rmtree(self._previous, ignore_errors=True)
        self._previous = path
        return SyncStats(counted.num_tensors, 1, counted.num_bytes, time.perf_counter() - start)

    def _load(self, path: Path, version: str) -> None:
        load = getattr(self.engine, "update_weights_from_disk", None)
        if load is not None:
            load(str(path), version)
            return
        self.engine.pause()
        try:
            self.engine.update_weights(iter_dense_state_dict(path), version=version)
            self.engine.flush_cache()
        finally:
            self.engine.resume()


class _Counter:
    """Passes named tensors through, counting them and their bytes."""

    def __init__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.weights, self.num_tensors, self.num_bytes = weights, 0, 0

    def __iter__(self):
        for name, tensor in self.weights:
            self.num_tensors += 1
            self.num_bytes += tensor.numel() * tensor.element_size()
            yield name, tensor
