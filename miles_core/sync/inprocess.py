"""In-process weight sync: the engine lives in the trainer's process and copies the tensors.

Host time is most of a small model's push (a 0.6B push copies 1.08 GB in ~0.5 ms on an H200,
and ~300 tensors cost Python on the way), so two things are skipped where they can be:

- the deadline's thread: on an engine whose waits take a bound (`bounded_waits`: the native
  engine's one wait is for its running step) the push runs on the caller's thread with that wait
  bounded by `sync.timeout_s`; two thread hand-offs were a fifth of a 0.6B push;
- the bucketing: a trainer that hands out the same `KeptWeights` push after push (the native
  trainer, while its parameters stay in place) gets the same bucket tuples back, which the engine
  knows by identity (its weight table checked them the first time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from miles_core.config import SyncConfig
from miles_core.engine.protocol import RolloutEngine
from miles_core.models.kept_weights import KeptWeights
from miles_core.sync.protocol import Named, SyncStats, sized_buckets


class InProcessSync:
    """`WeightSync` to an engine object of this process: bucket by bucket, paused meanwhile.

    Each bucket is checked (names, shapes) by the engine before any of it is written; the version
    is stamped with every bucket, and the engine answers no request until the last one is in.
    """

    def __init__(self, engine: RolloutEngine, cfg: SyncConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self._last: tuple[KeptWeights, list[tuple[tuple[Named, ...], int]]] | None = None
        """(the `KeptWeights` last pushed, its buckets as tuples with their bytes)."""

    def push(self, weights: Iterable[Named], version: str) -> SyncStats:
        return self.push_within(weights, version, lambda fn: fn())

    def push_within(self, weights: Iterable[Named], version: str, run: Callable[[Callable], SyncStats]) -> SyncStats:
        """`push`; on this thread with the engine's waits bounded by `sync.timeout_s` where it
        bounds them (`bounded_waits`), else through `run` (`TimedSync`: under its deadline)."""
        if getattr(self.engine, "bounded_waits", False):
            return self._push(weights, version, {"timeout_s": self.cfg.timeout_s or None})
        return run(lambda: self._push(weights, version, {}))

    def _push(self, weights: Iterable[Named], version: str, waits: dict) -> SyncStats:
        start = time.perf_counter()
        num_tensors = num_buckets = num_bytes = 0
        self.engine.pause()
        try:
            for bucket, size in self._buckets(weights):
                self.engine.update_weights(bucket, version=version, **waits)
                num_buckets += 1
                num_tensors += len(bucket)
                num_bytes += size
            self.engine.flush_cache(**waits)  # cached prefixes were computed with the old weights
        finally:
            self.engine.resume()
        return SyncStats(num_tensors, num_buckets, num_bytes, time.perf_counter() - start)

    def _buckets(self, weights: Iterable[Named]) -> Iterable[tuple[Sequence[Named], int]]:
        """The buckets of `weights` with their bytes, one at a time (tensors gathered afresh for a
        push are held a bucket at a time); of a `KeptWeights` (views: no memory of their own) as
        tuples, kept, and the same ones again when the next push hands the same object."""
        sized = sized_buckets(weights, self.cfg.bucket_mb << 20)
        if not isinstance(weights, KeptWeights):
            self._last = None
            return sized
        if self._last is None or self._last[0] is not weights:
            self._last = (weights, [(tuple(bucket), size) for bucket, size in sized])
        return self._last[1]
