"""CUDA graphs of the decode step: one captured forward per batch size of a ladder, replayed.

A decode step of a small model is bound by kernel launches, not by the GPU: a 28-layer model
launches a few hundred kernels per step, each costing microseconds of host time, while the math
of one token per row takes far less. A graph launches them all at once (vLLM / SGLang capture
decode the same way). What makes the step capturable: the paged decode kernel reads keys in
place through block tables (no gather with a step-dependent shape, no host synchronisation),
inputs live in static buffers the graph reads, and the batch is padded up to the next captured
size. Pad rows feed token 0 at position 0, write their k/v into the pool's null block and read
only it; their logits are dropped. Every kernel of a row depends only on that row (invariant
matmuls tile rows, attention runs one program per row and head), so in `invariant` mode a
replayed step gives the bits of the eager step at any batch size: KL = 0 holds with graphs.

Staging: a step's inputs (token, position, slot and block table of each row, padding rows after
them) are packed on the host into one int64 array by a few numpy operations over all rows at
once (`stage_decode_inputs`), in page-locked memory on CUDA, and copied to the device in one
asynchronous copy, then on the device into the graph's inputs (through views made once per
shape). Only the table columns some row reads are staged (M is the longest context's blocks:
640 columns for a 40,960-token model, of which a 1,000-token step reads 16). Two staging
buffers alternate; a buffer is written again two steps later, after the tokens of the step that
used it were read back (a host synchronisation ordered after its copy; with overlapped steps
that read comes one step later, still before the reuse). With overlapped steps the token column
is filled on the device from the previous step's sampler output.

Not captured: MoE models (expert grouping sizes its launches on the host) and steps that record
routing; those run eagerly. Weight updates copy into the same parameter storage, so graphs see
new weights without a recapture; a change of alignment mode recaptures.

Shape legend: B rows (real), G rows (captured batch size >= B), M block-table columns, V vocab.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence as Seqs
from itertools import chain
from operator import attrgetter, itemgetter

import numpy as np
import torch
from torch import nn

from miles_core.engine.native import paged_cache
from miles_core.engine.native.kv_pool import KVPool
from miles_core.engine.native.paged_cache import PagedKVCache
from miles_core.engine.native.sequence import Sequence
from miles_core.kernels import model_ops, paged_attention


def stage_decode_inputs(seqs: Seqs[Sequence], block_size: int, null_block: int, size: int,
                        buffer: np.ndarray, ahead: bool = False) -> np.ndarray:
    """Pack one decode step into the front of the flat `buffer`; returns it as (size, 3 + W):
    per row the token fed (the sequence's last), its position, its pool slot, then its block
    table up to the position's block and `null_block` after, over W columns, W = the largest
    row's table entries; rows past B are padding (token 0 at position 0, the null block's slot 0).
    The graph's table columns past W keep older entries: no row reads past its position's block.
    `ahead`: each row feeds a token sampled but not yet appended (position `len(token_ids)`; the
    token column is left 0 for the caller to fill on the device)."""
    B, P = len(seqs), block_size
    tables = list(map(attrgetter("block_table"), seqs))  # map with C callables: no Python frame per row
    token_lists = list(map(attrgetter("token_ids"), seqs))
    positions_B = np.fromiter(map(len, token_lists), dtype=np.int64, count=B) - (0 if ahead else 1)
    counts_B = positions_B // P + 1  # table entries up to the position's block
    W = int(counts_B.max())
    packed = buffer[: size * (3 + W)].reshape(size, 3 + W)
    packed[:, :2] = 0
    packed[:, 2] = null_block * P
    packed[:, 3:] = null_block
    lengths_B = np.fromiter(map(len, tables), dtype=np.int64, count=B)
    flat = np.fromiter(chain.from_iterable(tables), dtype=np.int64, count=int(lengths_B.sum()))
    row = np.repeat(np.arange(B), lengths_B)
    col = np.arange(flat.size) - np.repeat(np.cumsum(lengths_B) - lengths_B, lengths_B)
    if np.array_equal(lengths_B, counts_B):  # tables end at the position's block (decode steps)
        packed[row, 3 + col] = flat
    else:  # an admission gives blocks for every token: a table may hold one past the position's
        keep = col < counts_B[row]
        packed[row[keep], 3 + col[keep]] = flat[keep]
    if not ahead:
        packed[:B, 0] = np.fromiter(map(itemgetter(-1), token_lists), dtype=np.int64, count=B)
    packed[:B, 1] = positions_B
    packed[:B, 2] = packed[np.arange(B), 2 + counts_B] * P + positions_B % P
    return packed


def capturable(model: nn.Module, device: torch.device, *, enabled: bool, block_size: int, capture_routing: bool) -> bool:
    """Decode steps go through CUDA graphs: `engine.cuda_graphs` on CUDA with the paged kernel,
    dense models only (MoE expert grouping syncs with the host), no routing capture."""
    return (enabled and paged_attention.usable(device, block_size) and paged_cache.USE_PAGED_DECODE_KERNEL
            and not capture_routing and getattr(model, "num_moe_layers", 0) == 0)


def batch_size_ladder(max_batch_size: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8 up to 64 and every 16 beyond (at most 15
    rows of padding), ending at `max_batch_size`."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, max_batch_size + 1, 16)]
    sizes = [s for s in sizes if s < max_batch_size]
    return [*sizes, max_batch_size]


class DecodeGraphs:
    """Captured decode forwards (logits of every row) at the ladder's batch sizes."""

    def __init__(self, model: nn.Module, pool: KVPool, *, max_batch_size: int, max_blocks_per_row: int) -> None:
        self.model, self.pool = model, pool
        self.sizes = batch_size_ladder(max_batch_size)
        G, M, device = self.sizes[-1], max_blocks_per_row, pool.keys[0].device
        self.null_slot = pool.null_block * pool.block_size
        self.ids_G1 = torch.zeros(G, 1, dtype=torch.long, device=device)
        self.positions_G1 = torch.zeros(G, 1, dtype=torch.long, device=device)
        self.tables_GM = torch.full((G, M), pool.null_block, dtype=torch.long, device=device)
        self.slots_G = torch.full((G,), self.null_slot, dtype=torch.long, device=device)
        pinned = device.type == "cuda"
        self._staging = [torch.empty(G * (3 + M), dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._staging_np = [buffer.numpy() for buffer in self._staging]  # the same memory
        self._device_staging = torch.empty(G * (3 + M), dtype=torch.long, device=device)
        self._plans: dict[tuple[int, int], tuple] = {}
        self._num_runs = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._ops = None
        self._capture()

    @property
    def max_batch_size(self) -> int:
        return self.sizes[-1]

    def _forward(self, size: int) -> torch.Tensor:
        cache = PagedKVCache(self.pool, self.tables_GM[:size], self.slots_G[:size], None, 0,
                             decode_positions_B=self.positions_G1[:size, 0])
        hidden = self.model(self.ids_G1[:size], self.positions_G1[:size], cache, routing=None)
        return self.model.lm_head(hidden[:, 0])

    def _capture(self) -> None:
        """Largest size first, all in one memory pool (the smaller graphs reuse its blocks)."""
        self.graphs.clear()
        self.logits.clear()
        self._ops = model_ops(self.model)
        mempool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for size in reversed(self.sizes):
                for _ in range(2):  # outside capture: Triton compiles, cuBLAS picks its workspaces
                    self._forward(size)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=mempool):
                    self.logits[size] = self._forward(size)
                self.graphs[size] = graph
        torch.cuda.synchronize()

    def run(self, seqs: Seqs[Sequence], fed: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V) of one decode step of `seqs` (each feeds its last token, or `fed[b]`, a
        device tensor of tokens not yet appended; a view into the graph's output: use it before
        the next step). Rows past B are padding."""
        B = len(seqs)
        size = self.size_for(B)
        which, self._num_runs = self._num_runs % 2, self._num_runs + 1
        packed = stage_decode_inputs(seqs, self.pool.block_size, self.pool.null_block, size, self._staging_np[which],
                                     ahead=fed is not None)
        hosts, staged, copies = self._copy_plan(size, packed.shape[1] - 3)
        staged.copy_(hosts[which], non_blocking=True)  # one host-to-device copy per step
        for graph_input, column in copies:
            graph_input.copy_(column)
        if fed is not None:
            self.ids_G1[:B, 0].copy_(fed)
        return self.replay(size)[:B]

    def size_for(self, num_rows: int) -> int:
        """The captured batch size a step of `num_rows` rows is padded to."""
        return self.sizes[bisect.bisect_left(self.sizes, num_rows)]

    def replay(self, size: int) -> torch.Tensor:
        """Replay the graph of `size` rows on the inputs in its buffers; its logits (size, V)."""
        if model_ops(self.model) is not self._ops:
            self._capture()
        self.graphs[size].replay()
        return self.logits[size]

    def _copy_plan(self, size: int, width: int) -> tuple:
        """The views one (rows, table columns) shape of step copies through, made once (a torch
        view costs microseconds; a step took a dozen): the two host buffers, the device buffer,
        and (graph input, device column) pairs."""
        plan = self._plans.get((size, width))
        if plan is None:
            if len(self._plans) >= 64:  # shapes seen long ago
                self._plans.clear()
            n, shape = size * (3 + width), (size, 3 + width)
            staged = self._device_staging[:n].view(shape)
            copies = [(self.ids_G1[:size, 0], staged[:, 0]), (self.positions_G1[:size, 0], staged[:, 1]),
                      (self.slots_G[:size], staged[:, 2]), (self.tables_GM[:size, :width], staged[:, 3:])]
            plan = self._plans[(size, width)] = ([b[:n].view(shape) for b in self._staging], staged, copies)
        return plan
