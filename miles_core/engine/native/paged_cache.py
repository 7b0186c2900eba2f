"""`PagedKVCache`: one forward's view of the KV pool, behind the interface models already use.

Models call `kv_cache.update(layer, k_BKTD, v_BKTD, position_ids_BT) -> (keys, values)` and hand
the result to their attention op with the query positions (`layers.KVCache` does the same on a
dense cache). Here `update` writes the new tokens' k/v into the pool at their slots and returns
dense keys/values (B, K, S, D) gathered through each row's block table, where key s of a row is
the token at position s. S is the step's largest position + 1 (pads included). A query at
position p attends to keys 0..p only (the attention ops' position rule), so a row's keys past
its own length (a block's unwritten tail, or padding entries pointing at the pool's null block) never count;
the pool only holds finite numbers, so those masked keys add exact zeros. The attention op sees
the same key values as with the dense cache: invariant mode stays bitwise exact.

Models that find an `attend` method call it instead of `update` (`layers.attend`):
it stores the new k/v and runs attention itself. On CUDA with Triton and 64-token blocks, a
decode step (one token per row) reads keys in place with the paged kernel
(`kernels.paged_attention`, bitwise equal to the dense invariant kernel in invariant mode, and
free of host syncs and step-dependent shapes, so CUDA graphs can capture it); every other step
gathers dense keys (`gather`) for the model's attention op.

Shape legend: B rows, T new tokens per row, K kv heads, D head dim, N blocks per row,
P block size, S <= N * P keys.
"""

from __future__ import annotations

import torch

from miles_core.engine.native.kv_pool import KVPool
from miles_core.kernels import paged_attention

USE_PAGED_DECODE_KERNEL = True
"""Decode steps on CUDA read keys in place with the Triton paged kernel; False gathers them and runs
the model's own attention op (tests and diagnosis flip it)."""


class PagedKVCache:
    def __init__(self, pool: KVPool, block_tables_BN: torch.Tensor, slots: torch.Tensor,
                 token_index: torch.Tensor | None, num_keys: int, *, decode_positions_B: torch.Tensor | None = None) -> None:
        self.pool = pool
        self.block_tables_BN = block_tables_BN
        self.num_keys = num_keys
        """S = the step's largest position + 1, as the dense cache returns (SDPA's fast path sums
        in an order that depends on S: more masked keys would change fast-mode low bits)."""
        self._key_slots_BS: torch.Tensor | None = None
        self.slots = slots
        """Flat pool slot (block * P + row) of each real new token, in row-major (B, T) order."""
        self.token_index = token_index
        """Indices of the real tokens among the B * T fed (None: all are real, no padding)."""
        self.decode_positions_B = decode_positions_B
        """Set when every row feeds one token and the paged kernel can run: each row's position."""

    @property
    def key_slots_BS(self) -> torch.Tensor:
        """Pool slot of key s of row b: table[s // P] * P + s % P (computed once for all layers)."""
        if self._key_slots_BS is None:
            P = self.pool.block_size
            key_pos_S = torch.arange(self.num_keys, device=self.block_tables_BN.device)
            self._key_slots_BS = self.block_tables_BN[:, key_pos_S // P] * P + key_pos_S % P
        return self._key_slots_BS

    def attend(self, layer: int, q_BHTD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor,
               position_ids_BT: torch.Tensor, ops) -> torch.Tensor:
        """Store new k/v, then attention (B, H, T, V) of the queries over their rows' keys."""
        self._write(self.pool.keys[layer], k_BKTD)
        self._write(self.pool.values[layer], v_BKTD)
        if self.decode_positions_B is not None and USE_PAGED_DECODE_KERNEL:
            out_BHV = paged_attention.paged_decode(q_BHTD[:, :, 0], self.pool.keys[layer], self.pool.values[layer],
                                                   self.block_tables_BN, self.decode_positions_B,
                                                   invariant=ops.name == "invariant")
            return out_BHV[:, :, None]
        keys_BKSD, values_BKSV = self.gather(layer)
        return ops.attention(q_BHTD, keys_BKSD, values_BKSV, position_ids_BT, True)

    def update(self, layer: int, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor,
               position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k/v at their slots; return the rows' dense keys/values (B, K, S, D)."""
        self._write(self.pool.keys[layer], k_BKTD)
        self._write(self.pool.values[layer], v_BKTD)
        return self.gather(layer)

    def _write(self, pool_NPKD: torch.Tensor, new_BKTD: torch.Tensor) -> None:
        B, K, T, D = new_BKTD.shape
        flat = new_BKTD.transpose(1, 2).reshape(B * T, K, D)
        if self.token_index is not None:
            flat = flat.index_select(0, self.token_index)
        # Under autocast the new k/v may be bf16 while the pool is in the weights' dtype.
        pool_NPKD.view(-1, K, D).index_copy_(0, self.slots, flat.to(pool_NPKD.dtype))

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense keys and values (B, K, S, D) of every row (the fused-kernel seam)."""
        return self._dense(self.pool.keys[layer]), self._dense(self.pool.values[layer])

    def _dense(self, pool_NPKD: torch.Tensor) -> torch.Tensor:
        B, S = self.key_slots_BS.shape
        K, D = pool_NPKD.shape[2:]
        keys_BSKD = pool_NPKD.view(-1, K, D).index_select(0, self.key_slots_BS.view(-1)).view(B, S, K, D)
        # A (B, K, S, D) view, no second copy: SDPA's CPU kernel ran ~5x faster on it than on a
        # contiguous copy (64 rows x 64 keys, SmolLM2 heads). Fast-mode low bits may differ from
        # the old dense cache's strides (fast mode promises no bitwise equality); the invariant
        # ops sum over D, which is contiguous in both layouts, so invariant mode is unchanged.
        return keys_BSKD.transpose(1, 2)
