"""The paged KV pool: per layer, K and V tensors of fixed-size token blocks, and its sizing.

Layout per layer: keys (num_blocks, block_size, K, D) and values (num_blocks, block_size, K, V)
(vLLM's layout; V may differ from D: DeepSeek MLA caches per-head k = [k_nope | k_rope] and v).
Token t of a sequence lives in block `block_table[t // block_size]` at row `t % block_size`;
its flat slot is block * block_size + row. One extra block past the `num_blocks` the block
manager hands out is the null block: padded block-table entries point at it and padding rows of
a CUDA graph write their k/v into it. Attention reads a block's unwritten tail (masked out) and
the null block; masked keys add exact zeros only if they are
finite, so every block is zeroed once, when it is first handed out (`zero_block`), and block 0
at start. The pool itself is `torch.empty`: zero-filling it up front cost seconds on CPU for
memory most runs never touch, and untouched pages take no RAM (the OS maps them on first write).

Block size must be the invariant attention kernel's key tile (`triton_ops` BLOCK_N = 64), so a
future paged kernel walks one block per tile and reduces keys in the same order as today.

Colocation (`engine.colocate`): `release` frees the tensors while the trainer trains and
`restore` allocates them again, zeroed (every block counts as used once then); with
`engine.stable_memory` the K/V are instead views of a fixed-address region (`place`) whose
pages come and go under them (`stable_memory.py`).

Sizing: `engine.num_kv_blocks` when set; else on CUDA `engine.mem_fraction` of the free GPU
memory after the weights are loaded (SGLang's `mem_fraction_static`, applied to what is left),
capped at what `max_batch_size` sequences of `max_context_len` tokens can use;
on CPU enough for `max_batch_size` sequences of `max_context_len` tokens, capped at
`CPU_KV_BYTES` (set `num_kv_blocks` for more).

Shape legend: N blocks, P block size, K kv heads, D key head dim, V value head dim.
"""

from __future__ import annotations

import math

import torch

from miles_core.errors import MilesError
from miles_core.utils.layout import aligned_offsets

CPU_KV_BYTES = 2**30
ZERO_CHUNK = 64


class KVPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.null_block = num_blocks
        k_shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        v_shape = (num_blocks + 1, block_size, num_kv_heads, v_head_dim)
        self._shapes = (k_shape, v_shape)
        self.keys = [torch.empty(k_shape, dtype=dtype, device=device) for _ in range(num_layers)]  # (N, P, K, D)
        self.values = [torch.empty(v_shape, dtype=dtype, device=device) for _ in range(num_layers)]  # (N, P, K, V)
        self._zeroed = 0
        """Blocks below this id are zeroed (never-used blocks are handed out in id order)."""
        self._zero(slice(num_blocks, num_blocks + 1))

    def release(self) -> int:
        """Free the K/V tensors (a cache: the engine flushes its prefix cache with them); returns
        their bytes. Zero-size tensors stand in, so the pool still names its device and dtype."""
        freed = sum(t.numel() * t.element_size() for t in self.keys + self.values)
        self.keys = [t.new_empty(0) for t in self.keys]
        self.values = [t.new_empty(0) for t in self.values]
        return freed

    def restore(self) -> None:
        """Allocate the K/V tensors again after `release`, zeroed: blocks used before the release
        are not zeroed again when the block manager hands them out (see `zero_block`)."""
        k_shape, v_shape = self._shapes
        self.keys = [torch.zeros(k_shape, dtype=t.dtype, device=t.device) for t in self.keys]
        self.values = [torch.zeros(v_shape, dtype=t.dtype, device=t.device) for t in self.values]
        self._zeroed = self.null_block

    def bytes_needed(self, align: int) -> int:
        """Bytes of a buffer holding every K/V tensor at `align`-byte aligned offsets (`place`)."""
        return self._offsets(align)[-1]

    def place(self, buffer: torch.Tensor, align: int) -> None:
        """Hold the K/V tensors as views of the uint8 `buffer` (a fixed-address region of
        `stable_memory.py`); its contents count as undefined (`forget_contents`)."""
        dtype, (k_shape, v_shape) = self.keys[0].dtype, self._shapes
        offsets, n = self._offsets(align), len(self.keys)
        views = [buffer[start:start + _nbytes(shape, dtype)].view(dtype).view(shape)
                 for start, shape in zip(offsets, [k_shape] * n + [v_shape] * n)]
        self.keys, self.values = views[:n], views[n:]
        self.forget_contents()

    def forget_contents(self) -> None:
        """After the memory under the K/V tensors was replaced: the null block zeroed, every
        other block zeroed when first handed out again (`zero_block`)."""
        self._zeroed = 0
        self._zero(slice(self.null_block, self.null_block + 1))

    def _offsets(self, align: int) -> list[int]:
        """Start of each of the layers' K tensors, then their V tensors, then the end."""
        dtype, (k_shape, v_shape), n = self.keys[0].dtype, self._shapes, len(self.keys)
        offsets, end = aligned_offsets([_nbytes(shape, dtype) for shape in [k_shape] * n + [v_shape] * n], align)
        return [*offsets, end]

    @property
    def num_bytes(self) -> int:
        """Bytes the K/V tensors take now (0 while released)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def zero_block(self, block: int) -> None:
        """Make a never-used block finite (its first allocation; old contents are finite K/V).
        Zeroes the next `ZERO_CHUNK` blocks with it: one call per tensor instead of one per
        block (60 small calls per block for SmolLM2 were 2% of a CPU rollout)."""
        if block >= self._zeroed:
            end = min(max(block + 1, self._zeroed + ZERO_CHUNK), self.null_block)
            self._zero(slice(self._zeroed, end))  # all never used: ids above every block handed out
            self._zeroed = end

    def _zero(self, blocks: slice) -> None:
        for keys, values in zip(self.keys, self.values):
            keys[blocks].zero_()
            values[blocks].zero_()

    @property
    def num_blocks(self) -> int:
        """Blocks for sequences (the null block not counted)."""
        return self.null_block

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K/V in every layer (copy-on-write of a shared partial block)."""
        for keys, values in zip(self.keys, self.values):
            keys[dst].copy_(keys[src])
            values[dst].copy_(values[src])


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, v_head_dim: int,
                dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (K and V)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return num_layers * block_size * num_kv_heads * (head_dim + v_head_dim) * itemsize


def num_kv_blocks(*, requested: int, mem_fraction: float, per_block: int, device: torch.device,
                  max_batch_size: int, max_context_len: int, block_size: int) -> int:
    """How many blocks the pool gets (see the module docstring); raises when not even one
    sequence of `max_context_len` tokens would fit."""
    per_seq = -(-max_context_len // block_size)
    if requested:
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget, where = int(free * mem_fraction), f"{mem_fraction} of {free / 2**30:.2f} GiB free GPU memory"
    else:
        budget, where = CPU_KV_BYTES, f"the CPU default of {CPU_KV_BYTES / 2**30:.0f} GiB"
    # One block of the budget is the null block (see above). Never more than `max_batch_size` full
    # sequences can use: on a GPU shared with the trainer the rest of the budget stays free.
    count = min(budget // per_block - 1, max_batch_size * per_seq)
    if count < 1:
        raise MilesError(f"KV cache: {where} holds no block of {block_size} tokens "
                         f"({per_block / 2**20:.1f} MiB each); raise engine.mem_fraction or set engine.num_kv_blocks")
    return count
