"""Continuous decode windows: up to K decode steps on the device with no host sync between them.

`engine.num_continuous_decode_steps` = K (SGLang's `--num-continuous-decode-steps`, vLLM's
multi-step scheduling). A decode step spends about 2 ms of host time (schedule, stage, read the
tokens back, record them) in which a GPU idles; a window pays that once per K steps. It runs when
the step would be a pure decode step: every running sequence decodes, none waits or prefills, no
row has stop strings (only the host can match them), the model is dense and routing is not
captured. Otherwise, or when the pool cannot give the blocks, the engine runs a single step.

Before the window (`_plan`), on the host, once: each row's steps n_b = min(K, tokens left);
the blocks of its next n_b positions (taken only from free blocks that hold no cached prefix,
so the prefix cache evicts what single steps would; with fewer such blocks the window shortens,
below 2 steps it does not run); its n_b uniforms drawn from its own stream, in order, as n_b
single steps would; then tokens, positions, slots, block tables, uniforms and stop ids are put
on the device in one copy.

Each step: the forward (the captured graph, or the eager forward), the sampler (the same ops as
a single step), and device ops that set the next step's inputs: token = the one just sampled,
the next position, its slot. A row that samples a stop id is marked on the device and writes
its later k/v into the null block, so the blocks it reserved past its end stay unwritten.
- Graphs: every row keeps computing to the window's end at the same padded batch size, so a row
  that stops mid-window is computed and discarded. In `invariant` mode each row's numbers are
  its own: the single steps' bits. In `fast` mode a single step after a stop runs fewer rows and
  may pad to a smaller captured size, whose GEMMs may round differently: then (and only then)
  fast-mode bits can differ from K = 1.
- Eager (CPU, or graphs off): a fast-mode forward's numbers depend on its batch (GEMM blocking,
  SDPA's key count), so the window drops stopped rows between steps as single steps do; that
  reads the stop mask (a host sync on a GPU), and gives K = 1's bits in both modes.

After the window: one read-back of the K x B tokens and log-probs, then host bookkeeping step by
step in order (counts, prefix-cache registration, appends, stop checks, retiring); a row that
stopped at step j keeps its tokens up to j; the blocks it reserved beyond its end go back to the
front of the free list. Submissions, aborts, pauses, weight updates and memory release wait for
the window's end (at most K steps).

Shape legend: K steps, B rows, W block-table columns, S stop ids per row, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from miles_core.engine.native import paged_cache
from miles_core.engine.native.paged_cache import PagedKVCache
from miles_core.engine.native.runner import ModelRunner
from miles_core.engine.native.sampling_tensors import SamplingTensors
from miles_core.engine.native.scheduler import Row, Scheduler
from miles_core.engine.native.sequence import Sequence
from miles_core.engine.native.streams import uniforms
from miles_core.engine.sampler import sample_tokens
from miles_core.kernels import model_ops, paged_attention
from miles_core.utils.device import to_device


@dataclass
class _Plan:
    seqs: list[Sequence]
    num_steps: int
    counts_B: np.ndarray
    """Steps of each row before its token budget ends (<= num_steps)."""
    taken_B: np.ndarray
    """Blocks reserved for each row (the last ones of its block table)."""
    positions_KB: np.ndarray
    tokens_B: torch.Tensor
    """Device tensors from here on: the last token of each row."""
    dev_positions_KB: torch.Tensor
    slots_KB: torch.Tensor
    """Pool slot of the token fed at each step; the null block's slot past the row's budget."""
    uniform_KB: torch.Tensor
    tables_BW: torch.Tensor
    stops_BS: torch.Tensor


class DecodeWindow:
    """Runs decode windows over the scheduler's running sequences (see the module docstring)."""

    def __init__(self, num_steps: int, scheduler: Scheduler, runner: ModelRunner, sampling: SamplingTensors,
                 record: Callable[[list[Sequence], list[int], list[float]], None], answer: Callable[[], None]) -> None:
        self.num_steps = num_steps
        self.scheduler, self.blocks, self.runner = scheduler, scheduler.blocks, runner
        self.sampling = sampling
        self.record = record
        """The engine's per-step bookkeeping: append each row's token and log-prob, retire the finished."""
        self.answer = answer
        """Answer the requests finished before, while the first forward runs."""

    @classmethod
    def of(cls, num_steps: int, scheduler: Scheduler, runner: ModelRunner, sampling: SamplingTensors, record,
           answer, *, capture_routing: bool) -> DecodeWindow | None:
        """The engine's windows, or None: K = 1, routing capture (recorded per step), or an MoE
        model (its expert grouping syncs with the host every layer)."""
        if num_steps == 1 or capture_routing or getattr(runner.model, "num_moe_layers", 0):
            return None
        return cls(num_steps, scheduler, runner, sampling, record, answer)

    def run(self) -> bool:
        """Run a window if the next step is a pure decode step that can take one; False otherwise
        (the caller runs a single step)."""
        plan = self._plan()
        if plan is None:
            return False
        params = self.sampling.of([seq.request.sampling for seq in plan.seqs], self.runner.device)
        graphs = self.runner.graphs
        if graphs is not None and paged_cache.USE_PAGED_DECODE_KERNEL:
            tokens_KB, logprobs_KB = self._graph_steps(plan, params, graphs)
        else:
            tokens_KB, logprobs_KB = self._eager_steps(plan, params)
        self._bookkeep(plan, tokens_KB.tolist(), logprobs_KB.tolist())  # the window's one read-back
        return True

    # -- before the window -----------------------------------------------------------------
    def _plan(self) -> _Plan | None:
        sched, seqs = self.scheduler, self.scheduler.running
        if sched.waiting or sched.prefilling or not seqs or any(seq.request.sampling.stop for seq in seqs):
            return None
        P = self.blocks.block_size
        lengths_B = np.fromiter(map(len, (seq.token_ids for seq in seqs)), dtype=np.int64, count=len(seqs))
        left_B = np.array([seq.max_new_tokens - (seq.length - seq.prompt_len) for seq in seqs], dtype=np.int64)
        have_B = np.array([len(seq.block_table) for seq in seqs], dtype=np.int64)
        for k in range(min(self.num_steps, int(left_B.max())), 1, -1):
            counts_B = np.minimum(k, left_B)
            # The last position fed is length - 2 + count: its block and all before it.
            need_B = np.maximum(-(-(lengths_B - 1 + counts_B) // P) - have_B, 0)
            total = int(need_B.sum())
            if self.blocks.num_fresh(total) == total:
                break
        else:
            return None
        for seq, need in zip(seqs, need_B.tolist()):
            seq.block_table += [self.blocks.allocate() for _ in range(need)]
        return self._stage(list(seqs), k, counts_B, need_B, lengths_B)

    def _stage(self, seqs: list[Sequence], K: int, counts_B: np.ndarray, taken_B: np.ndarray,
               lengths_B: np.ndarray) -> _Plan:
        """Everything the window's steps read, packed into one int64 array and copied once."""
        B, P, null = len(seqs), self.blocks.block_size, self.runner.pool.null_block
        steps_K = np.arange(K)[:, None]
        # A row past its budget feeds its last position again, into the null block's slot.
        positions_KB = lengths_B[None, :] - 1 + np.minimum(steps_K, counts_B[None, :] - 1)
        W = int(((positions_KB[-1] // P) + 1).max())
        stop_lists = [sorted(seq.stop_ids) for seq in seqs]
        S = max(map(len, stop_lists))
        sizes = [B, K * B, K * B, K * B, B * W, B * S]
        packed = np.empty(sum(sizes), dtype=np.int64)
        tokens, positions, slots, bits, tables, stops = np.split(packed, np.cumsum(sizes)[:-1])
        tokens[:] = [seq.token_ids[-1] for seq in seqs]
        positions[:] = positions_KB.reshape(-1)
        tables_BW = tables.reshape(B, W)
        tables_BW[:] = null
        for b, seq in enumerate(seqs):
            used = int(positions_KB[-1, b]) // P + 1
            tables_BW[b, :used] = seq.block_table[:used]
        slots_KB = tables_BW[np.arange(B)[None, :], positions_KB // P] * P + positions_KB % P
        slots[:] = np.where(steps_K < counts_B[None, :], slots_KB, null * P).reshape(-1)
        bits[:] = self._uniforms(seqs, K, counts_B).view(np.int32).reshape(-1)
        stops_BS = stops.reshape(B, S)
        stops_BS[:] = -1  # no token id
        for b, ids in enumerate(stop_lists):
            stops_BS[b, : len(ids)] = ids
        dev = to_device(torch.from_numpy(packed), self.runner.device)
        d_tokens, d_positions, d_slots, d_bits, d_tables, d_stops = dev.split(sizes)
        return _Plan(seqs, K, counts_B, taken_B, positions_KB, d_tokens, d_positions.view(K, B),
                     d_slots.view(K, B), d_bits.to(torch.int32).view(torch.float32).view(K, B),
                     d_tables.view(B, W), d_stops.view(B, S))

    @staticmethod
    def _uniforms(seqs: list[Sequence], K: int, counts_B: np.ndarray) -> np.ndarray:
        """(K, B) float32: row b's next counts_B[b] draws from its own stream, in order (0 after)."""
        out = np.zeros((K, len(seqs)), dtype=np.float32)
        for s in range(K):
            rows = np.flatnonzero(counts_B > s)
            out[s, rows] = uniforms([seqs[b].stream for b in rows]).numpy()
        return out

    # -- on the device ---------------------------------------------------------------------
    def _sample(self, logits_BV: torch.Tensor, params, uniform_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        temperature, top_k, top_p, flags = params
        return sample_tokens(logits_BV, temperature, top_k, top_p, uniform_B, flags=flags,
                             log_softmax=model_ops(self.runner.model).log_softmax)

    @staticmethod
    def _still_running(alive_B: torch.Tensor, tokens_B: torch.Tensor, stops_BS: torch.Tensor) -> torch.Tensor:
        """Rows that sampled none of their stop ids (a device op: no host sync)."""
        if stops_BS.shape[1] == 0:
            return alive_B
        return alive_B & ~(tokens_B[:, None] == stops_BS).any(dim=1)

    def _graph_steps(self, plan: _Plan, params, graphs) -> tuple[torch.Tensor, torch.Tensor]:
        B = len(plan.seqs)
        size, null_slot = graphs.size_for(B), graphs.null_slot
        tokens_B, alive_B = plan.tokens_B, torch.ones(B, dtype=torch.bool, device=plan.tokens_B.device)
        outputs = []
        for s in range(plan.num_steps):
            slots_B = torch.where(alive_B, plan.slots_KB[s], null_slot)  # a stopped row writes the null block
            graphs.set_inputs(size, tokens_B, plan.dev_positions_KB[s], slots_B, plan.tables_BW if s == 0 else None)
            logits_BV = graphs.replay(size)[:B]
            if s == 0:
                self.answer()  # host work while the first forward runs on a GPU
            tokens_B, logprobs_B = self._sample(logits_BV, params, plan.uniform_KB[s])
            outputs.append((tokens_B, logprobs_B))
            alive_B = self._still_running(alive_B, tokens_B, plan.stops_BS)
        return torch.stack([t for t, _ in outputs]), torch.stack([lp for _, lp in outputs])

    def _eager_steps(self, plan: _Plan, params) -> tuple[torch.Tensor, torch.Tensor]:
        B, device = len(plan.seqs), plan.tokens_B.device
        tokens_B = plan.tokens_B
        logprobs_B = torch.zeros(B, device=device)
        alive_B = torch.ones(B, dtype=torch.bool, device=device)
        outputs = []
        for s in range(plan.num_steps):
            live = [b for b, ok in enumerate(alive_B.tolist()) if ok and s < plan.counts_B[b]]  # a host sync
            if not live:
                break
            index = None if len(live) == B else torch.tensor(live, device=device)
            logits_LV = self._eager_forward(plan, s, live, index, tokens_B)
            picked = [p if index is None else p.index_select(0, index) for p in params[:3]]
            uniform = plan.uniform_KB[s] if index is None else plan.uniform_KB[s, index]
            tokens_L, logprobs_L = self._sample(logits_LV, (*picked, params[3]), uniform)
            if s == 0:
                self.answer()
            if index is None:
                tokens_B, logprobs_B = tokens_L, logprobs_L
            else:  # rows that stopped keep their last values (read back, never recorded)
                tokens_B = tokens_B.index_copy(0, index, tokens_L)
                logprobs_B = logprobs_B.index_copy(0, index, logprobs_L)
            outputs.append((tokens_B, logprobs_B))
            alive_B = self._still_running(alive_B, tokens_B, plan.stops_BS)
        return torch.stack([t for t, _ in outputs]), torch.stack([lp for _, lp in outputs])

    def _eager_forward(self, plan: _Plan, s: int, live: list[int], index: torch.Tensor | None,
                       tokens_B: torch.Tensor) -> torch.Tensor:
        """Logits of the live rows at step s, with the inputs `ModelRunner._inputs` gives a decode step."""
        pool, P = self.runner.pool, self.runner.pool.block_size
        tokens, positions, slots, tables = tokens_B, plan.dev_positions_KB[s], plan.slots_KB[s], plan.tables_BW
        if index is not None:
            tokens, positions, slots, tables = (t.index_select(0, index) for t in (tokens, positions, slots, tables))
        num_keys = int(plan.positions_KB[s, live].max()) + 1  # the step's largest position + 1
        columns_N = torch.arange(-(-num_keys // P), device=tables.device)
        # Entries past a row's position block are the null block, as a single step stages them.
        tables = torch.where(columns_N[None, :] <= (positions // P)[:, None], tables[:, : columns_N.numel()],
                             pool.null_block)
        decode = paged_attention.usable(tables.device, P)
        cache = PagedKVCache(pool, tables, slots, None, num_keys, decode_positions_B=positions if decode else None)
        model = self.runner.model
        hidden_B1E = model(tokens[:, None], positions[:, None], cache, routing=None)
        return model.lm_head(hidden_B1E[:, 0])

    # -- after the window ------------------------------------------------------------------
    def _bookkeep(self, plan: _Plan, tokens_KB: list[list[int]], logprobs_KB: list[list[float]]) -> None:
        """Record the steps in order, as single steps would have; give back unused reserved blocks."""
        steps_B = [self._steps_taken(seq, [row[b] for row in tokens_KB], int(plan.counts_B[b]))
                   for b, seq in enumerate(plan.seqs)]
        for b, seq in enumerate(plan.seqs):
            keep = self.blocks.blocks_for(seq.length + steps_B[b] - 1)  # blocks of the positions it fed
            for _ in range(min(int(plan.taken_B[b]), len(seq.block_table) - keep)):
                self.blocks.unallocate(seq.block_table.pop())
        for s in range(len(tokens_KB)):
            rows = [b for b in range(len(plan.seqs)) if s < steps_B[b]]
            if not rows:
                break
            seqs = [plan.seqs[b] for b in rows]
            self.scheduler.computed([Row(seq, seq.length - 1, 1) for seq in seqs])
            self.record(seqs, [tokens_KB[s][b] for b in rows], [logprobs_KB[s][b] for b in rows])

    @staticmethod
    def _steps_taken(seq: Sequence, tokens: list[int], count: int) -> int:
        """Steps row `seq` computed: up to its first stop id, or its budget."""
        for s, token in enumerate(tokens[:count]):
            if token in seq.stop_ids:
                return s + 1
        return count
