"""One generated sequence's state in the native engine, and the handle of a submitted request.

A request asks for `n` samples; each sample is a `Sequence` with its own token list, block
table, logprobs, routed experts and sampling stream (`sample_seed(request seed, j)`, one uniform
per generated token, `streams`), so its tokens do not depend on which sequences share its steps,
on preemption, or on prefix-cache hits.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from miles_core.engine.native.streams import torch_stream
from miles_core.engine.protocol import GenerateRequest, Generation
from miles_core.errors import MilesError


def sample_seed(request_seed: int, sample_index: int) -> int:
    """Seed of sample j of a request: distinct per (seed, j), stable across runs."""
    return (request_seed * 1_000_003 + sample_index * 7919 + 12345) % (2**63 - 1)


@dataclass(eq=False)
class Sequence:
    request: GenerateRequest
    handle: RequestHandle
    sample_index: int
    max_new_tokens: int
    stream: random.Random
    """The sampling stream (`streams.torch_stream`): one `getrandbits(32)` per sampled token."""
    token_ids: list[int]
    """Prompt then output tokens."""
    prompt_len: int
    logprobs: list[float] = field(default_factory=list)
    finish_reason: dict | None = None
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose K/V are in the pool (all but the last sampled one while decoding)."""
    num_registered: int = 0
    """Leading blocks entered into the prefix cache (or found there)."""
    routing: list[np.ndarray] = field(default_factory=list)
    """MoE: chunks of (tokens, layers, topk) expert ids of the tokens fed so far."""
    num_routed: int = 0
    """Tokens whose routing is recorded; a recompute after preemption records none twice."""
    forks: list[Sequence] = field(default_factory=list)
    """The request's other samples, waiting for this one's prompt prefill to share it."""
    stop_ids: frozenset[int] = frozenset()
    """Tokens that stop it: the engine's eos ids and the request's stop ids (the engine sets it;
    a token outside it, with no stop strings and below the length limit, cannot finish it)."""
    length_limit: int = field(init=False)
    """Token count at which it finishes by length: prompt + max_new_tokens."""
    check_finish_from: int = field(init=False)
    """Token count from which every sampled token may finish it (0 with stop strings; else the
    length limit), so the engine's per-row test is one comparison."""

    def __post_init__(self) -> None:
        self.length_limit = self.prompt_len + self.max_new_tokens
        self.check_finish_from = 0 if self.request.sampling.stop else self.length_limit

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class RequestHandle:
    """A submitted request: its n sequences, finished when all of them are."""

    def __init__(self, request: GenerateRequest, on_progress: Callable[[int], None] | None = None) -> None:
        self.request = request
        self.on_progress = on_progress
        self.sequences: list[Sequence] = []
        self.generations: list[Generation] | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[RequestHandle], None]] = []
        self._callbacks_lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def finish(self, generations: list[Generation]) -> None:
        self.generations = generations
        with self._callbacks_lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[RequestHandle], None]) -> None:
        """Call `callback(handle)` once the request has finished (at once if it has); it runs on
        the engine's thread, so it must only hand the result over (e.g. `call_soon_threadsafe`)."""
        with self._callbacks_lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def result(self, timeout: float | None = None) -> list[Generation]:
        """The request's n generations, waiting for them (when a background loop runs)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request '{self.request.rid}' did not finish in {timeout} s")
        return self.generations


def new_handle(request: GenerateRequest, on_progress: Callable[[int], None] | None, *, max_context_len: int,
               eos_token_ids: frozenset[int], blocks) -> RequestHandle:
    """Check a request against the context length and the pool (`blocks`, the engine's
    `BlockManager`) and make its handle with its n sequences."""
    prompt_len = len(request.input_ids)
    if prompt_len == 0:
        raise MilesError(f"request '{request.rid}' has an empty prompt")
    if prompt_len >= max_context_len:
        raise MilesError(f"prompt of request '{request.rid}' has {prompt_len} tokens; the context "
                         f"holds {max_context_len} (engine.max_context_len or the model's limit)")
    budget = min(request.sampling.max_new_tokens, max_context_len - prompt_len)
    need = blocks.blocks_for(prompt_len + budget - 1)
    if need > blocks.num_blocks:
        raise MilesError(f"request '{request.rid}' needs {need} KV blocks of {blocks.block_size} tokens "
                         f"({prompt_len} prompt + {budget} new); the pool has {blocks.num_blocks} "
                         "(raise engine.num_kv_blocks or engine.mem_fraction)")
    handle = RequestHandle(request, on_progress)
    stop_ids = eos_token_ids | frozenset(request.sampling.stop_token_ids)
    handle.sequences = [
        Sequence(request, handle, j, budget, torch_stream(sample_seed(request.seed, j)), list(request.input_ids),
                 prompt_len, stop_ids=stop_ids)
        for j in range(request.sampling.n_samples_per_prompt)
    ]
    return handle
