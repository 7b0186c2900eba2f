"""Many tensor copies in one launch: the engine's weight updates (in-process, CUDA IPC and NCCL
pushes) copy 300-400 tensors at once.

Why our own: torch's multi-tensor copy (`_foreach_copy_`) reached 64-67% of a flat copy's
bandwidth on an H200 (Qwen3-0.6B shapes, 311 bf16 tensors, 1.08 GB: 0.735 ms against a flat copy's
0.469 ms; 4B shapes 5.29 against 3.53 ms) and spent ~0.4 ms of host time a call on its chunk
lists; the weight-sync goals are within 2x of a flat copy, whole push included. Here one Triton
launch walks a table of 64 KiB chunks (source address, destination address, length), built once
per (sources, destinations) and kept on the device: 0.495 ms at 0.6B, 3.67 ms at 4B (95-96% of
the flat copy; `bench/results/weight_sync.md`, run 10).

The kernel takes a pair when both lie on the same CUDA device, share a dtype, are contiguous, and
start on an 8-byte boundary with one byte count divisible by 8 (it copies int64 words); every other
pair goes through `_foreach_copy_`. Either way a copy: the bits of `copy_`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs copy with torch
    triton = None

CHUNK_WORDS = 8192
"""int64 words a program copies (64 KiB)."""
BLOCK = 4096
NUM_WARPS = 8
MAX_PLANS = 64
"""Keys (bucket signatures) whose chunk tables are kept (a 4B push is ~16 buckets of 512 MiB)."""

if triton is not None:

    @triton.jit
    def _copy_chunks_kernel(table, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * 3
        source = tl.load(table + row).to(tl.pointer_type(tl.int64))
        destination = tl.load(table + row + 1).to(tl.pointer_type(tl.int64))
        length = tl.load(table + row + 2)
        for start in tl.range(0, CHUNK, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < length
            tl.store(destination + offsets, tl.load(source + offsets, mask=inside), mask=inside)


@dataclass
class CopyPlan:
    table: torch.Tensor | None
    """int64 (chunks, 3) on the device: source address, destination address, words."""
    rest: list[int]
    """Indices of the pairs `_foreach_copy_` copies."""
    runs: int = 0
    graph: object = None
    """The kernel's launch captured in a CUDA graph once the plan ran twice (False: capture failed)."""


def fits_kernel(destination: torch.Tensor, source: torch.Tensor) -> bool:
    return (triton is not None and destination.is_cuda and source.device == destination.device
            and source.dtype == destination.dtype and source.is_contiguous() and destination.is_contiguous()
            and source.data_ptr() % 8 == 0 and destination.data_ptr() % 8 == 0 and source.nbytes % 8 == 0
            and source.nbytes == destination.nbytes)  # a copy never writes past its destination


def plan_copies(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> CopyPlan:
    """The chunk table of the pairs the kernel takes, and the others."""
    taken = [i for i, (d, s) in enumerate(zip(destinations, sources)) if fits_kernel(d, s)]
    chosen = set(taken)
    rest = [i for i in range(len(destinations)) if i not in chosen]
    if not taken:
        return CopyPlan(None, rest)
    table = chunk_table([sources[i].data_ptr() for i in taken], [destinations[i].data_ptr() for i in taken],
                        [sources[i].nbytes // 8 for i in taken])
    return CopyPlan(table.to(destinations[taken[0]].device), rest)


def chunk_table(source_at: list[int], destination_at: list[int], words: list[int],
                chunk: int = CHUNK_WORDS) -> torch.Tensor:
    """int64 (chunks, 3): each copy of `words[i]` int64 words from byte address `source_at[i]` to
    `destination_at[i]` cut into pieces of at most `chunk` words (address, address, words)."""
    words_t = torch.tensor(words, dtype=torch.int64)
    chunks = (words_t + chunk - 1) // chunk
    pair = torch.repeat_interleave(torch.arange(len(words)), chunks)
    first_chunk = torch.cumsum(chunks, 0) - chunks
    word = (torch.arange(int(chunks.sum())) - first_chunk[pair]) * chunk
    sources = torch.tensor(source_at, dtype=torch.int64)[pair] + word * 8
    destinations = torch.tensor(destination_at, dtype=torch.int64)[pair] + word * 8
    return torch.stack([sources, destinations, torch.clamp(words_t[pair] - word, max=chunk)], dim=1)


def run_plan(plan: CopyPlan, destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Copy every pair as `plan` says (on the current stream). A plan run again and again (a
    trainer's weights pushed step after step) replays its launch as a CUDA graph: ~6 us of host
    time where Triton's launcher took 26-90 us on GPU hosts (`bench/results/weight_sync.md`: run
    15's timers, the probes before run 18)."""
    if plan.table is not None:
        with torch.cuda.device(plan.table.device):
            if plan.graph:
                plan.graph.replay()  # on the current stream, reading the table's addresses
            else:
                _launch(plan)
                plan.runs += 1
                if plan.runs == 2 and plan.graph is None:
                    plan.graph = _captured(plan)
    if plan.rest:
        torch._foreach_copy_([destinations[i] for i in plan.rest], [sources[i] for i in plan.rest])


def _launch(plan: CopyPlan) -> None:
    _copy_chunks_kernel[(plan.table.shape[0],)](plan.table, CHUNK=CHUNK_WORDS, BLOCK=BLOCK, num_warps=NUM_WARPS)


def _captured(plan: CopyPlan) -> object:
    """The plan's launch captured in a CUDA graph on a side stream (only this thread's calls are
    checked meanwhile), or False where capturing fails (then it launches each time). Not through
    `torch.cuda.graph`, which synchronises and empties the allocator's cache first."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                _launch(plan)
            finally:
                graph.capture_end()
    except RuntimeError:
        return False
    return graph


class BatchedCopier:
    """`copy(destinations, sources, key)` with the plan of each of the last `MAX_PLANS` keys kept.

    A plan holds addresses, so `key` must fix the destinations and name the sources' dtypes and
    shapes: the engine's weight table passes its checked (name, dtype, shape) list and clears the
    plans when its weights move; the staging buffer passes its layout's signature and the buffer's
    address. A key's plan serves while the sources lie at the same addresses and is replaced when
    they move (weights gathered afresh each push), so the tables on the device stay one per key."""

    def __init__(self) -> None:
        self._plans: OrderedDict[tuple, tuple[tuple[int, ...], CopyPlan]] = OrderedDict()
        self._last: tuple | None = None
        """(key, addresses, plan) of the last copy: the same key object again (the weight table
        hands out the key it kept) is known without hashing it (~300 entries at 0.6B)."""

    def copy(self, destinations: list[torch.Tensor], sources: list[torch.Tensor], key: tuple | None) -> None:
        if key is None or triton is None or not destinations or not destinations[0].is_cuda:
            torch._foreach_copy_(destinations, sources)  # any layout or device: copy_ per pair
            return
        addresses = tuple(map(torch.Tensor.data_ptr, sources))  # C-level: ~300 calls a push
        last = self._last
        if last is not None and last[0] is key and last[1] == addresses:  # no hash of a ~300-entry key
            run_plan(last[2], destinations, sources)
            return
        kept = self._plans.get(key)
        if kept is not None and kept[0] == addresses:
            plan = kept[1]
            self._plans.move_to_end(key)
        else:
            plan = plan_copies(destinations, sources)
            self._plans[key] = (addresses, plan)
            self._plans.move_to_end(key)
            if len(self._plans) > MAX_PLANS:
                self._plans.popitem(last=False)
        self._last = (key, addresses, plan)
        run_plan(plan, destinations, sources)

    def clear(self) -> None:
        """Forget every plan (the destinations moved: a memory release)."""
        self._plans.clear()
        self._last = None
