"""The native in-process rollout engine: continuous batching over a paged KV cache.

Files by responsibility: `kv_pool` (the K/V block tensors and their sizing), `block_manager`
(reference-counted blocks, the prefix cache), `paged_cache` (the cache view models write to and
read from in one forward), `scheduler` (queues, chunked prefill, preemption, sample forks),
`runner` (one forward, routing capture), `cuda_graphs` (captured decode steps), `sequence` (per-sample state), `outputs` (finish
reasons, generations) and `engine` (the `RolloutEngine` facade, submission and stepping).
"""

from miles_core.engine.native.engine import NativeEngine
from miles_core.engine.native.sequence import sample_seed

__all__ = ["NativeEngine", "sample_seed"]
