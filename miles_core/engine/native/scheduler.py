"""Continuous-batching scheduler: which sequences run in the next forward, and their blocks.

Queues: `waiting` (submitted or preempted, no blocks), `prefilling` (admitted, prompt partly
computed: chunked prefill) and `running` (decoding one token per step), each in admission order.
Each step is a prefill step or a decode step (nano-vllm's policy, plus chunking):
- prefill: first continue the partly prefilled sequences, then admit waiting ones in order
  while the batch has room (`max_batch_size` sequences, a request's samples counted too) and
  the pool has blocks for the whole prompt; a step feeds at most `max_num_batched_tokens`
  tokens, so a long prompt is prefilled in chunks across steps.
- decode: every running sequence feeds its last token. When the pool has no block for a
  sequence's next token, the most recently admitted running sequence is preempted by
  recompute: its blocks are freed and it goes back to the head of `waiting` with its tokens,
  to be prefilled again (prompt + output) later. Its sampling stream is untouched, so its
  output is the same as without preemption.
A request's n samples are admitted as one sequence; when its prompt is prefilled the others
are forked from it (`fork`): they share its full prompt blocks and copy its last partial one.
A sample that finds no room at that moment waits as a sequence of its own (it will find the
prompt's full blocks in the prefix cache). On admission a sequence first takes the longest
cached prefix of its tokens (always leaving one token to compute, for the logits).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from miles_core.engine.native.block_manager import BlockManager
from miles_core.engine.native.sequence import Sequence


@dataclass(slots=True)
class Row:
    """One sequence in a step: it feeds tokens `start`..`start + num_tokens - 1`."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def completes(self) -> bool:
        """After this step every token of the sequence is computed: it samples the next one."""
        return self.start + self.num_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(self, blocks: BlockManager, copy_block: Callable[[int, int], None], *, max_batch_size: int,
                 max_num_batched_tokens: int, cache_routing: bool) -> None:
        self.blocks = blocks
        self.copy_block = copy_block
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.cache_routing = cache_routing
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.decoding = False
        """The last `schedule` gave a decode step (every row feeds its last token, none has forks)."""

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> list[Row]:
        """The rows of the next forward: a prefill step if any prompt can make progress, else
        a decode step over the running sequences (empty when there is nothing to do)."""
        rows = self._prefill_rows()
        self.decoding = not rows
        return rows or self._decode_rows()

    def _prefill_rows(self) -> list[Row]:
        rows, budget = [], self.max_num_batched_tokens
        for seq in self.prefilling:
            if budget == 0:
                return rows
            rows.append(Row(seq, seq.num_computed, min(seq.length - seq.num_computed, budget)))
            budget -= rows[-1].num_tokens
        while self.waiting and budget > 0 and self._has_room(self.waiting[0]) and self._admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self.prefilling.append(seq)
            rows.append(Row(seq, seq.num_computed, min(seq.length - seq.num_computed, budget)))
            budget -= rows[-1].num_tokens
        return rows

    def _has_room(self, seq: Sequence) -> bool:
        active = len(self.running) + len(self.prefilling)
        # A request whose samples exceed the batch is admitted alone; the extra samples wait.
        return active + 1 + len(seq.forks) <= self.max_batch_size or active == 0

    def _admit(self, seq: Sequence) -> bool:
        """Give a waiting sequence its cached prefix and blocks for all its tokens, or leave it
        waiting (with nothing taken) when the pool is short."""
        cached = self.blocks.match_prefix(seq.token_ids, seq.length - 1)
        need = self.blocks.blocks_for(seq.length) - len(cached)
        if need > self.blocks.num_free:
            self.blocks.free(cached)
            self.blocks.num_hits -= len(cached)
            return False
        seq.block_table = cached + [self.blocks.allocate() for _ in range(need)]
        seq.num_computed = seq.num_registered = len(cached)
        seq.num_computed *= self.blocks.block_size
        if self.cache_routing and seq.num_routed < seq.num_computed:
            seq.routing = [self.blocks.blocks[b].routing for b in cached]
            seq.num_routed = seq.num_computed
        return True

    def _decode_rows(self) -> list[Row]:
        if not self._grow_tables(self.running, fed_offset=1):
            return self._decode_rows_preempting()
        return [Row(seq, len(seq.token_ids) - 1, 1) for seq in self.running]

    def _grow_tables(self, seqs: list[Sequence], fed_offset: int) -> bool:
        """Give each sequence the block of the token it feeds (position `len(token_ids) -
        fed_offset`), in order, the blocks `_decode_rows_preempting` would take; False, taking
        none, when the pool has too few."""
        size = self.blocks.block_size
        # The fed token's block is missing only when it starts a new block.
        short = [seq for seq in seqs if len(seq.token_ids) - fed_offset >= size * len(seq.block_table)]
        if len(short) > self.blocks.num_free:
            return False
        for seq in short:
            seq.block_table.append(self.blocks.allocate())
        return True

    def decode_rows_ahead(self, seqs: list[Sequence]) -> list[Row] | None:
        """Rows of the decode step after one whose sampled tokens are not read yet (`seqs`, its
        rows): each feeds that pending token, at position `len(token_ids)`. None when the step
        cannot be planned without the tokens: a prefill step comes next (waiting or prefilling
        sequences), the running set changed, a pending token ends its sequence by length, or the
        pool is short of blocks (the plain decode step preempts)."""
        if self.waiting or self.prefilling or seqs != self.running:
            return None
        if any(len(seq.token_ids) + 1 >= seq.length_limit for seq in seqs):
            return None
        if not self._grow_tables(seqs, fed_offset=0):
            return None
        self.decoding = True
        return [Row(seq, len(seq.token_ids), 1) for seq in seqs]

    def _decode_rows_preempting(self) -> list[Row]:
        """Decode rows when the pool cannot give every running sequence its next block."""
        scheduled: list[Sequence] = []
        queue = deque(self.running)
        while queue:
            seq = queue.popleft()
            while not self._reserve_next(seq):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(seq)
        self.running = scheduled
        return [Row(seq, seq.length - 1, 1) for seq in scheduled]

    def _reserve_next(self, seq: Sequence) -> bool:
        """Make sure the block of the token fed next exists; False when the pool is empty."""
        if (seq.length - 1) // self.blocks.block_size < len(seq.block_table):
            return True
        if self.blocks.num_free == 0:
            return False
        seq.block_table.append(self.blocks.allocate())
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table, seq.num_computed, seq.num_registered = [], 0, 0

    # -- after the forward -----------------------------------------------------------------
    def computed(self, rows: list[Row]) -> None:
        """Record the step's computed tokens and enter newly full blocks into the prefix cache;
        rows whose prompt is done move to `running` (caller samples their next token)."""
        size, prefilling = self.blocks.block_size, self.prefilling  # read once: a loop over every row
        for row in rows:
            seq = row.seq
            seq.num_computed = num_computed = row.start + row.num_tokens
            full = num_computed // size
            if full > seq.num_registered:
                routing = np.concatenate(seq.routing) if self.cache_routing else None
                self.blocks.register(seq.block_table, seq.token_ids, seq.num_registered, full, routing)
                seq.num_registered = full
            if prefilling and row.completes and seq in prefilling:
                prefilling.remove(seq)
                self.running.append(seq)

    def fork(self, leader: Sequence) -> list[Sequence]:
        """Start the samples waiting on `leader`'s prompt; returns those that start now (they
        sample from the leader's logits); the others go to `waiting` on their own."""
        if not leader.forks:  # every decode row: return before the O(batch) index below
            return []
        forks, leader.forks, started = leader.forks, [], []
        size = self.blocks.block_size
        full, partial = divmod(leader.num_computed, size)
        for seq in forks:
            room = len(self.running) + len(self.prefilling) < self.max_batch_size
            if not room or (partial and self.blocks.num_free == 0):
                self.waiting.append(seq)
                continue
            for block_id in leader.block_table[:full]:
                self.blocks.share(block_id)
            seq.block_table = leader.block_table[:full]
            if partial:  # copy on write: each sample appends to its own copy of the last block
                seq.block_table.append(self.blocks.allocate())
                self.copy_block(leader.block_table[full], seq.block_table[-1])
            seq.num_computed, seq.num_registered = leader.num_computed, leader.num_registered
            seq.routing, seq.num_routed = list(leader.routing), leader.num_routed
            started.append(seq)
        at = self.running.index(leader) + 1  # a request's samples stay together (old batch order)
        self.running[at:at] = started
        return started

    def finish(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence from every queue and free its blocks."""
        for queue in (self.running, self.prefilling):
            if seq in queue:
                queue.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
