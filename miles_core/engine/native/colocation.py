"""`NativeEngine`'s colocation half (`engine.colocate`): giving its device memory to a trainer and
taking it back.

`release_memory` frees the KV pool and CUDA graphs and moves the weights to host memory
(`memory.py`) while a trainer uses the device; requests are refused until `resume_memory` brings
the same weights back and allocates a fresh pool; on CUDA with `engine.stable_memory` both keep
their addresses instead, so the CUDA graphs survive (`stable_memory.py`). A mixin over the
engine's lock, pool, weights and graphs, kept apart from `engine.py` for size.

`release_memory(keep_weights=False)` drops the weights instead of copying them out and back (a
colocated run rewrites every weight by its sync right after each resume: SGLang, without
`--enable-weights-cpu-backup`, drops them too). Only what no sync carries is kept (the RoPE
frequencies). Until updates have written every weight again, generation is refused with the
names still missing, so a sync that leaves one out fails loudly instead of generating from
whatever the fresh memory held.
"""

from __future__ import annotations

from miles_core.engine.native import stable_memory
from miles_core.engine.native.memory import (HostWeights, device_allocated, free_cached, weights_to_device,
                                             weights_to_host)
from miles_core.engine.native.stable_memory import StableMemory, model_tensors, unwritten_spans
from miles_core.errors import MilesError


class EngineReleased(MilesError):
    """A request reached an engine whose memory is released (`release_memory`)."""


class MemoryControl:
    def _init_memory_control(self) -> None:
        self._host: HostWeights | None = None
        """Set while the memory is released (`release_memory`): where the weights went."""
        self._stable: StableMemory | None = None
        """`engine.stable_memory`: the fixed-address regions, from the first release on."""
        self._stable_released = False
        self._kept_spans: list[tuple[int, int]] | None = None
        """The weights region's bytes a release that drops the weights still copies out."""

    def check_weights_written(self, what: str) -> None:
        """Refuse `what` while weights dropped at a release are not written again."""
        missing = self.weights.unwritten()
        if missing:
            raise EngineReleased(f"{what}: {len(missing)} of the engine's weights were dropped at release_memory and "
                                 f"no update has written them since (first: '{missing[0]}'); sync every weight "
                                 "first, or keep them on release (engine.weights_cpu_backup = true)")

    @property
    def released(self) -> bool:
        """Whether `release_memory` gave the device memory away (generation is refused)."""
        return self._host is not None or self._stable_released

    def release_memory(self, keep_weights: bool = True) -> dict[str, int]:
        """Free the KV pool and the CUDA graphs and move the weights to host memory (pinned on
        CUDA), or drop them (`keep_weights=False`: module docstring), so a colocated trainer can
        use the GPU; refused while requests are in flight. With `engine.stable_memory` (CUDA)
        the pool and weights keep their addresses and the graphs stay (`stable_memory.py`).
        Returns the bytes of each part (`weights_bytes` copied to the host,
        `weights_dropped_bytes`) and `gpu_freed_bytes` (the CUDA allocator's drop plus the pages
        given back; 0 on CPU)."""
        with self._step_lock:
            if self.released:
                return {"kv_cache_bytes": 0, "weights_bytes": 0, "weights_dropped_bytes": 0, "gpu_freed_bytes": 0}
            self._settle()
            with self._inbox_lock:
                busy = len(self._handles) + len(self._inbox)
            if busy:
                raise MilesError(f"release_memory: {busy} requests are in flight; let them finish or abort them first")
            self.blocks.flush()  # the cached K/V go with the pool
            if self.cfg.stable_memory and stable_memory.supported(self.device):
                return self._release_stable(keep_weights)
            device, before = self.device, device_allocated(self.device)
            self.runner.graphs = None  # graphs point into the pool and at the weights' addresses
            kv_bytes = self.pool.release()
            self._host = weights_to_host(self.model, keep_weights)
            self.weights.invalidate()  # buffers were replaced
            if not keep_weights:
                self.weights.expect_rewrite()
            free_cached(device)
            return {"kv_cache_bytes": kv_bytes, "weights_bytes": self._host.num_bytes,
                    "weights_dropped_bytes": self._host.dropped_bytes, "gpu_freed_bytes": before - device_allocated(device)}

    def _release_stable(self, keep_weights: bool) -> dict[str, int]:
        device = self.device
        if self._stable is None:
            self.runner.graphs = None  # captured at the addresses the move changes
            try:
                self._stable = StableMemory.adopt(self.model, self.pool, device)
            except MilesError as err:
                raise MilesError(f"release_memory: {err}; set engine.stable_memory = false to free and "
                                 "reallocate the memory instead") from None
            self.weights.invalidate()
        kept = None if keep_weights else self._spans_no_sync_writes()
        copied = self._stable.weights_bytes if kept is None else sum(nbytes for _, nbytes in kept)
        before = device_allocated(device)
        unmapped = self._stable.release(kept)
        self._stable_released = True
        if not keep_weights:
            self.weights.expect_rewrite()
        free_cached(device)
        return {"kv_cache_bytes": self._stable.pool_bytes, "weights_bytes": copied,
                "weights_dropped_bytes": self._stable.weights_bytes - copied,
                "gpu_freed_bytes": unmapped + before - device_allocated(device)}

    def _spans_no_sync_writes(self) -> list[tuple[int, int]]:
        """(offset, bytes) in the weights region of the tensors no weight update writes (worked
        out once: nothing moves in the region)."""
        if self._kept_spans is None:
            written = list(self.weights.tensors().values())
            self._kept_spans = unwritten_spans(model_tensors(self.model, self.device), written,
                                               self._stable.weights.tensor.data_ptr())
        return self._kept_spans

    def resume_memory(self) -> None:
        """Undo `release_memory`: the same weights (bitwise; after a release that dropped them,
        memory that updates must write before generation), a fresh KV pool (or the same
        addresses, `engine.stable_memory`), graphs captured again when they were dropped."""
        with self._step_lock:
            if self._stable_released:
                self._stable.restore(self.pool)
                self._stable_released = False
            elif self._host is not None:
                weights_to_device(self.model, self._host)
                self.weights.invalidate()
                self.pool.restore()
                self._host = None
            if self.runner.graphs is None:
                self._capture_graphs()
        self._notify()
