"""KV block allocation with reference counts and a prefix cache across requests.

Blocks are indices into the KV pool (`kv_pool.KVPool`). A block is owned by one or more
sequences (its reference count); the n samples of a request share their prompt's full blocks.
A block whose tokens are all computed is *registered* in the prefix cache under a hash chain
of the token ids of it and every block before it (vLLM / nano-vllm automatic prefix caching).
When its last owner frees it, a registered block keeps its contents and stays findable while
it waits in the free list; a later request whose prompt starts with the same tokens reuses it
instead of recomputing. Fresh blocks are taken from the front of the free list, where blocks
freed longest ago sit, so cached blocks are evicted least recently used first.

A hit must match exactly, not only by hash: the block's stored token ids must equal the
request's, and its parent (the previous block of the chain, by id and allocation epoch) must
be the block the request matched just before. A hash collision therefore costs a recompute,
never wrong keys.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def block_hash(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Hash of a full block given its parent's hash (-1 for the first block)."""
    return hash((parent_hash, tuple(token_ids)))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    epoch: int = 0
    """Bumped on every fresh allocation, so a stale parent reference is detected."""
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    parent: tuple[int, int] | None = None
    """(block id, epoch) of the previous block in the chain; None for a first block."""
    routing: np.ndarray | None = None
    """MoE routing capture: the experts of the block's tokens (P, layers, topk), so a prefix
    hit still returns the routed experts of every prompt token."""


class BlockManager:
    """Reference-counted blocks, a LRU free list and the hash -> block prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, on_first_use: Callable[[int], None] | None = None) -> None:
        self.block_size = block_size
        self.on_first_use = on_first_use
        """Called with a block id the first time it is allocated (the pool zeroes it)."""
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # hash -> block id
        self.num_hits = 0
        """Blocks found in the prefix cache so far (a statistic)."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks with no owner (cached ones included: they are evictable)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- plain allocation ------------------------------------------------------------------
    def allocate(self) -> int:
        """A fresh block (evicting the least recently freed cached block if need be)."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        self._forget(block)
        if block.epoch == 0 and self.on_first_use is not None:
            self.on_first_use(block_id)
        block.ref_count, block.epoch = 1, block.epoch + 1
        return block_id

    def share(self, block_id: int) -> None:
        """One more owner of a block that has one already (prefix sharing between samples)."""
        self.blocks[block_id].ref_count += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; unowned blocks go to the back of the free list."""
        for block_id in reversed(block_ids):  # a chain's tail is evicted before its head
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    # -- prefix cache ----------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], limit: int) -> list[int]:
        """Take a reference to the cached blocks holding the longest prefix of `token_ids`,
        at most `limit` tokens long; returns their ids in order."""
        matched: list[int] = []
        parent_hash, parent = -1, None
        size = self.block_size
        for start in range(0, limit - size + 1, size):
            ids = tuple(token_ids[start : start + size])
            h = block_hash(parent_hash, ids)
            block_id = self._cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != ids or block.parent != parent:  # a collision: recompute instead
                break
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            matched.append(block_id)
            self.num_hits += 1
            parent_hash, parent = h, (block_id, block.epoch)
        return matched

    def register(self, block_ids: Sequence[int], token_ids: Sequence[int], first: int, end: int,
                 routing: np.ndarray | None = None) -> None:
        """Enter blocks `first`..`end`-1 of a sequence (all of whose tokens are computed) into
        the prefix cache; blocks before `first` are registered already. `routing`: the
        sequence's routed experts so far (token, layer, topk), kept with each block."""
        size = self.block_size
        parent_hash = self.blocks[block_ids[first - 1]].hash if first else -1
        if parent_hash is None:
            return  # the chain broke at an earlier block: later blocks could never be matched
        parent = self._ref(block_ids[first - 1]) if first else None
        for index in range(first, end):
            block = self.blocks[block_ids[index]]
            ids = tuple(token_ids[index * size : (index + 1) * size])
            if block.hash is None:  # a shared prompt block may have been registered by a sibling
                h = block_hash(parent_hash, ids)
                if h not in self._cached:  # keep the older copy; this one stays private
                    block.hash, block.token_ids, block.parent = h, ids, parent
                    block.routing = None if routing is None else routing[index * size : (index + 1) * size]
                    self._cached[h] = block.block_id
            if block.hash is None:
                return  # the chain breaks here: later blocks could never be matched
            parent_hash, parent = block.hash, self._ref(block.block_id)

    def flush(self) -> None:
        """Forget every cached block (their K/V belong to old weights, say). Only registered blocks
        carry a hash, so this walks the cache, not the pool (tens of thousands of blocks on a GPU)."""
        for block_id in self._cached.values():
            block = self.blocks[block_id]
            block.hash, block.token_ids, block.parent, block.routing = None, (), None, None
        self._cached.clear()

    def _ref(self, block_id: int) -> tuple[int, int]:
        return block_id, self.blocks[block_id].epoch

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self._cached.get(block.hash) == block.block_id:
            del self._cached[block.hash]
        block.hash, block.token_ids, block.parent, block.routing = None, (), None, None
