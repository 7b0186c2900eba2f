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

Not captured: MoE models (expert grouping sizes its launches on the host) and steps that record
routing; those run eagerly. Weight updates copy into the same parameter storage, so graphs see
new weights without a recapture; a change of alignment mode recaptures.

Shape legend: B rows (real), G rows (captured batch size >= B), M block-table columns, V vocab.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch
from torch import nn

from miles_core.engine.native.kv_pool import KVPool
from miles_core.engine.native.paged_cache import PagedKVCache
from miles_core.kernels import model_ops


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

    def run(self, ids_B: list[int], positions_B: list[int], slots_B: list[int],
            tables_B: list[list[int]]) -> torch.Tensor:
        """Logits (B, V) of one decode step (a view into the graph's output: use it before the
        next step). Rows past B are padding."""
        if model_ops(self.model) is not self._ops:
            self._capture()
        B = len(ids_B)
        size = self.sizes[bisect.bisect_left(self.sizes, B)]
        M = self.tables_GM.shape[1]
        packed = np.empty((size, 3 + M), dtype=np.int64)  # one host-to-device copy per step
        packed[:, 0], packed[:, 1], packed[:, 2], packed[:, 3:] = 0, 0, self.null_slot, self.pool.null_block
        packed[:B, 0], packed[:B, 1], packed[:B, 2] = ids_B, positions_B, slots_B
        for b, table in enumerate(tables_B):
            packed[b, 3 : 3 + len(table)] = table  # each table ends at its row's position's block
        staged = torch.from_numpy(packed).to(self.ids_G1.device, non_blocking=True)
        self.ids_G1[:size, 0].copy_(staged[:, 0])
        self.positions_G1[:size, 0].copy_(staged[:, 1])
        self.slots_G[:size].copy_(staged[:, 2])
        self.tables_GM[:size].copy_(staged[:, 3:])
        self.graphs[size].replay()
        return self.logits[size][:B]
