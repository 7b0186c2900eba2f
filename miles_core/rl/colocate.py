"""`engine.colocate`: the rollout engine and the trainer take turns on the same GPUs.

One step: generate (the engine holds its memory; the optimizer state waits in host memory) ->
the engine releases its memory (KV cache, CUDA graphs, and its weights: dropped, since the sync
below rewrites them all, or copied to host with `engine.weights_cpu_backup`) -> the
trainer trains, reloading its optimizer state as it starts (the copies overlap its first passes:
`train/offload.py`) -> it offloads the state again -> the engine takes its memory back (its
weights copied back, or left for the sync) -> the new weights are synced into it, every one of
them (the engine refuses to generate until they are). The engine is the native one in this process
(one GPU shared with trainer rank 0) or launched / external servers, through their memory routes.

Metrics, so the saving is measured (all `perf/`, in GiB):
- `engine_released_gb`: what the engine's release freed on its GPU (the CUDA allocator's drop, in
  this process or as `miles serve` reports it); 0 on CPU, and 0 for SGLang servers (no report).
- `engine_kv_released_gb`: the KV pool bytes the native engine(s) freed (host memory on CPU); 0 for
  SGLang servers.
- `optimizer_offloaded_gb`: optimizer state moved off the GPU; 0 on CPU.
- `gpu_mem_after_release_gb`: this process's allocated GPU memory once the engine released its own;
  `gpu_mem_during_rollout_gb` / `gpu_mem_during_train_gb`: its peak while generating / training.
  Absent without CUDA. `peak_gpu_memory_gb` stays the whole step's peak.
"""

from __future__ import annotations

import torch

from miles_core.engine.protocol import RolloutEngine
from miles_core.train.protocol import TrainBackend

GIB = 2**30


class Colocation:
    """Turn-taking of one run's engine and trainer; does nothing when colocation is off.
    `keep_weights=False` lets the engine drop its weights at each release: the run's loop syncs
    every weight right after each resume."""

    def __init__(self, engine: RolloutEngine | None = None, trainer: TrainBackend | None = None,
                 keep_weights: bool = True) -> None:
        self.engine, self.trainer, self.keep_weights = engine, trainer, keep_weights
        self.enabled = engine is not None and trainer is not None
        self._rollout_peak = 0.0

    def before_train(self) -> dict[str, float]:
        """The engine gives its GPU memory away (the trainer's `train_rollout` takes its optimizer
        state back, overlapped with its first passes)."""
        if not self.enabled:
            return {}
        cuda = torch.cuda.is_available()
        self._rollout_peak = torch.cuda.max_memory_allocated() / GIB if cuda else 0.0
        freed = self.engine.release_memory(keep_weights=self.keep_weights)
        out = {"perf/engine_released_gb": freed.get("gpu_freed_bytes", 0) / GIB,
               "perf/engine_kv_released_gb": freed.get("kv_cache_bytes", 0) / GIB}
        if cuda:
            out["perf/gpu_mem_during_rollout_gb"] = self._rollout_peak
            out["perf/gpu_mem_after_release_gb"] = torch.cuda.memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()  # the next peak is the training's
        return out

    def after_train(self) -> dict[str, float]:
        """The trainer's optimizer state goes to host memory; the engine takes its memory back."""
        if not self.enabled:
            return {}
        out = {}
        if torch.cuda.is_available():
            out["perf/gpu_mem_during_train_gb"] = torch.cuda.max_memory_allocated() / GIB
        out["perf/optimizer_offloaded_gb"] = self.trainer.offload_optimizer() / GIB
        self.engine.resume_memory()
        return out

    def whole_step_peak(self, metrics: dict[str, float]) -> None:
        """`perf/peak_gpu_memory_gb` over the whole step (the peak counter restarted for training)."""
        if self.enabled and "perf/peak_gpu_memory_gb" in metrics:
            metrics["perf/peak_gpu_memory_gb"] = max(metrics["perf/peak_gpu_memory_gb"], self._rollout_peak)
