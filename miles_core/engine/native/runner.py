"""The model runner: one forward over a scheduled step, on the paged KV pool.

Rows are right-padded to the step's longest chunk (B, T) with explicit positions (a pad
continues its row's positions; its k/v are not stored and its outputs are dropped). Routing
capture records, per sequence, the experts of each token fed that it has not recorded yet, so
prefill chunks and decode steps concatenate in token order and a recompute after preemption
records nothing twice. Logits are computed only for rows that sample this step.

On CUDA, decode steps of dense models replay captured graphs (`cuda_graphs`) when the runner
was given them; prefill and mixed steps, MoE models and routing capture run eagerly.

Shape legend: B rows, T tokens per row, E hidden size, V vocab, N blocks per row.
"""

from __future__ import annotations

import torch
from torch import nn

from miles_core.engine.native.cuda_graphs import DecodeGraphs
from miles_core.engine.native.kv_pool import KVPool
from miles_core.engine.native import paged_cache
from miles_core.engine.native.paged_cache import PagedKVCache
from miles_core.engine.native.scheduler import Row
from miles_core.kernels import paged_attention
from miles_core.models.routing import RoutingContext


class ModelRunner:
    def __init__(self, model: nn.Module, pool: KVPool, *, capture_routing: bool) -> None:
        self.model = model
        self.pool = pool
        self.capture_routing = capture_routing
        self.graphs: DecodeGraphs | None = None
        """Set by the engine when decode steps can be captured (`cuda_graphs`)."""

    @property
    def device(self) -> torch.device:
        return self.pool.keys[0].device

    def forward(self, rows: list[Row], *, decoding: bool = False, fed: torch.Tensor | None = None) -> torch.Tensor:
        """Run the step; returns logits (R, V) of the rows that complete, in row order.
        `decoding`: the scheduler made a decode step (spares checking every row). `fed`: a decode
        step planned ahead (`Scheduler.decode_rows_ahead`): the (B,) device tensor of the tokens
        the rows feed, sampled by the step before and not yet in their token lists."""
        if self.graphs is not None and self._graphable(rows, decoding):
            return self.graphs.run([row.seq for row in rows], fed=fed)
        ids_BT, positions_BT, cache = self._inputs(rows, fed)
        routing = RoutingContext("record") if self.capture_routing else None
        hidden_BTE = self.model(ids_BT, positions_BT, cache, routing=routing)
        if routing is not None:
            self._record_routing(rows, routing)
        sampling = [(b, row.num_tokens - 1) for b, row in enumerate(rows) if fed is not None or row.completes]
        if not sampling:
            return hidden_BTE.new_empty(0)
        index = torch.tensor(sampling, device=hidden_BTE.device)
        return self.model.lm_head(hidden_BTE[index[:, 0], index[:, 1]])

    def _graphable(self, rows: list[Row], decoding: bool) -> bool:
        """A step where every row feeds its last token (a decode step, or a prefill step whose
        rows each compute one token) that the captured graphs can take."""
        if not paged_cache.USE_PAGED_DECODE_KERNEL:  # diagnosis switched the kernel off
            return False
        return len(rows) <= self.graphs.max_batch_size and (
            decoding or all(r.num_tokens == 1 and r.completes for r in rows))

    def _inputs(self, rows: list[Row], fed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, PagedKVCache]:
        B, T = len(rows), max(row.num_tokens for row in rows)
        size = self.pool.block_size
        ids = torch.zeros(B, T, dtype=torch.long)
        positions = torch.empty(B, T, dtype=torch.long)
        num_keys = max(row.start for row in rows) + T  # largest position fed (pads included) + 1
        num_blocks = -(-num_keys // size)
        tables = torch.full((B, num_blocks), self.pool.null_block, dtype=torch.long)  # padding: finite zeros
        slots, token_index = [], []
        for b, row in enumerate(rows):
            seq, end = row.seq, row.start + row.num_tokens
            if fed is None:
                ids[b, : row.num_tokens] = torch.tensor(seq.token_ids[row.start : end])
            positions[b] = torch.arange(row.start, row.start + T)
            table = seq.block_table[: -(-end // size)]
            tables[b, : len(table)] = torch.tensor(table)
            slots += [table[p // size] * size + p % size for p in range(row.start, end)]
            token_index += range(b * T, b * T + row.num_tokens)
        device = self.device
        padded = len(token_index) < B * T
        decode = T == 1 and paged_attention.usable(device, size)  # one query per row: the paged kernel
        cache = PagedKVCache(self.pool, tables.to(device), torch.tensor(slots, device=device),
                             torch.tensor(token_index, device=device) if padded else None, num_keys,
                             decode_positions_B=positions[:, 0].to(device) if decode else None)
        return (ids.to(device) if fed is None else fed.view(B, 1)), positions.to(device), cache

    def _record_routing(self, rows: list[Row], routing: RoutingContext) -> None:
        ids_BTLK = routing.stacked()
        for b, row in enumerate(rows):
            seq = row.seq
            first = max(seq.num_routed, row.start) - row.start
            if first < row.num_tokens:
                seq.routing.append(ids_BTLK[b, first : row.num_tokens])
                seq.num_routed = row.start + row.num_tokens
