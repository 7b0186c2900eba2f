"""Attention over packed sequences: several sequences back to back in one row, no padding.

A packed forward runs one row (B = 1) of T tokens holding many sequences. Each token carries its
own position id (restarting at 0 per sequence), and attention must never cross sequences. The
row is cut into segments; segment i holds queries [start, end) and attends to the keys of an
optional earlier `prefix` range of the row followed by its own tokens, causally. So

- plain packing: one segment per sequence, no prefix (a document mask, `cu_seqlens` style);
- packing with a shared prompt: the prompt is one segment, and each of its samples' responses is
  a segment whose prefix is that prompt (a tree mask: the responses see the prompt, never each
  other). The prompt's tokens are computed once for all its samples.

Within a segment's keys (prefix, then own tokens) a key's index equals its position id, exactly
as in a KV cache, so each segment can be handed to the ordinary per-row attention op with
`cached = True` (or `False` when it has no prefix: keys are then the queries, a plain causal
row). That is what `segment_attention` does, one op call per segment: with the batch-invariant
op it gives the bits of the padded forward and of the engine (a row's result depends on that
row alone), and with SDPA each plain segment takes the flash path. (On CUDA, invariant mode runs
all segments in one launch of the same kernel instead: `triton_ops.packed_attention`.)

On CUDA in fast mode (bf16/fp16, equal q/k and v head dims) the whole row instead goes through
one variable-length flash-attention call (`torch.nn.attention.varlen.varlen_attn`, the
`cu_seqlens` kernel of flash-attention): segment i's queries are its own tokens, its keys are its
prefix's tokens gathered in front of its own (`PackedSegments.varlen_layout`, built once per
forward), and the causal mask is aligned bottom-right, so each query sees exactly the keys the
segment loop gives it. One kernel per layer instead of one SDPA call, three slices and a
concatenation per segment: with 64 samples of 28 layers the loop launched ~50k kernels per
training step and left the GPU idle (W1 profile, H100, 2026-11-27).
`flex_attention` (CUDA, fast mode) is the other one-kernel path, with a block-sparse mask built
once per forward from per-token (document, branch) ids; it is chosen once at import when enabled
(`USE_FLEX`, off by default: see below; tests override it).

Shape legend: H query heads, K kv heads, T tokens of the row, D head dim, DV value head dim.
"""

from __future__ import annotations

import functools
import itertools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from miles_core.utils.device import to_device

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # older torch: the segment loop serves every device
    flex_attention = None
try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10: the segment loop
    varlen_attn = None

USE_FLEX = False
"""Use FlexAttention for fast-mode packed attention on CUDA tensors. Off: on an H100 with torch
2.11 its compiled kernel failed to lower (inductor `NoValidChoicesError`, 2026-11-27), and the
per-segment SDPA loop runs instead; tests override it."""


@dataclass
class PackedSegments:
    """Segments of one packed row: (start, end, prefix_start, prefix_end) each, tiling [0, T) in
    order; an empty prefix is (0, 0). Passed to the model where a KV cache would go: the
    attention layers recognise it and attend within segments."""

    segments: list[tuple[int, int, int, int]]
    varlen: VarlenLayout | None = None
    """The row's variable-length attention layout, made before the forward on CUDA (`for_device`),
    so that compiled layers read tensors instead of tracing the segment list."""
    _block_masks: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def for_device(segments: list[tuple[int, int, int, int]], device) -> PackedSegments:
        """The segments, with their varlen layout when `device` is CUDA (read by fast mode's flash
        call and invariant mode's Triton kernel)."""
        cuda = torch.device(device).type == "cuda"
        return PackedSegments(segments, VarlenLayout.of(segments, device) if cuda else None)

    @property
    def num_tokens(self) -> int:
        return self.segments[-1][1] if self.segments else 0

    def ids(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (document, branch) ids (T,): a prefix and the segments that attend to it share
        a document; a segment with a prefix is its own branch, prefix tokens are branch 0."""
        doc, branch = torch.empty(self.num_tokens, dtype=torch.int32), torch.zeros(self.num_tokens, dtype=torch.int32)
        owner = {}  # prefix start -> its document id
        for i, (start, end, p_start, p_end) in enumerate(self.segments):
            if p_end > p_start:
                doc[start:end], branch[start:end] = owner[p_start], i + 1
            else:
                doc[start:end] = owner.setdefault(start, i)
        return doc.to(device), branch.to(device)

    def block_mask(self, device):
        """FlexAttention's block mask, built once per forward and shared by every layer."""
        key = str(device)
        if key not in self._block_masks:
            doc, branch = self.ids(device)

            def mask_mod(b, h, q_idx, kv_idx):
                same_tree = (doc[q_idx] == doc[kv_idx]) & ((branch[kv_idx] == 0) | (branch[kv_idx] == branch[q_idx]))
                return (kv_idx <= q_idx) & same_tree

            T = self.num_tokens
            self._block_masks[key] = create_block_mask(mask_mod, None, None, T, T, device=device)
        return self._block_masks[key]



@dataclass(frozen=True)
class VarlenLayout:
    """Queries are the row's tokens in order (segments tile it); keys of segment i are its prefix
    then its own tokens: `key_index` gathers them from the row (None when no segment has a prefix:
    the keys are the row itself). `cu_q`/`cu_k` are the int32 cumulative lengths; `max_q`/`max_k`
    are rounded up to a power of two (flash attention only sizes its grid by them; blocks past a
    segment's end exit at once), so a compiled layer sees few distinct values and recompiles rarely."""

    key_index: torch.Tensor | None
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    @staticmethod
    def of(segments: list[tuple[int, int, int, int]], device) -> VarlenLayout:
        q_lens = [end - start for start, end, _, _ in segments]
        k_lens = [end - start + p_end - p_start for start, end, p_start, p_end in segments]
        key_index = None
        if any(p_end > p_start for _, _, p_start, p_end in segments):
            ranges = [torch.arange(p_start, p_end) for _, _, p_start, p_end in segments]
            key_index = to_device(torch.cat([torch.cat((r, torch.arange(start, end))) for r, (start, end, _, _)
                                             in zip(ranges, segments)]), device)

        def cumulative(lengths: list[int]) -> torch.Tensor:
            return to_device(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32), device)

        def bucket(length: int) -> int:
            return 1 << max(length - 1, 0).bit_length()

        return VarlenLayout(key_index, cumulative(q_lens), cumulative(k_lens), bucket(max(q_lens)), bucket(max(k_lens)))


# Not traced by torch.compile (`train.compile`): the segment list changes every micro-batch and
# would recompile the layer each time; attention runs eagerly between compiled regions.
@torch.compiler.disable
def segment_attention(attention: Callable, q_1HTD, k_1KTD, v_1KTD, position_ids_1T,
                      packed: PackedSegments) -> torch.Tensor:
    """Packed attention as one per-row `attention(q, k, v, position_ids, cached)` call per segment."""
    outs = []
    for start, end, p_start, p_end in packed.segments:
        q, k, v = q_1HTD[:, :, start:end], k_1KTD[:, :, start:end], v_1KTD[:, :, start:end]
        if p_end > p_start:
            k = torch.cat((k_1KTD[:, :, p_start:p_end], k), dim=2)
            v = torch.cat((v_1KTD[:, :, p_start:p_end], v), dim=2)
        outs.append(attention(q, k, v, position_ids_1T[:, start:end], p_end > p_start))
    return torch.cat(outs, dim=2)  # (1, H, T, DV)


@functools.cache
def _compiled_flex():
    # FlexAttention is only fast compiled; dynamic shapes because T changes every micro-batch.
    return torch.compile(flex_attention, dynamic=True)


def flex_packed_attention(q_1HTD, k_1KTD, v_1KTD, packed: PackedSegments, compiled: bool = True) -> torch.Tensor:
    """The whole packed row in one FlexAttention call (same mask as `segment_attention`)."""
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q_1HTD, k_1KTD, v_1KTD, block_mask=packed.block_mask(q_1HTD.device),
              enable_gqa=q_1HTD.shape[1] != k_1KTD.shape[1])


def _varlen_kwargs() -> dict:
    # torch 2.10 spells the causal mask `is_causal`; later versions a (left, right) window, where
    # (-1, 0) is causal aligned bottom-right (queries are the last tokens of their keys). GQA is
    # native to the flash kernel; torch >= 2.12 asks for it by name. Read once: compiled layers
    # must not trace `inspect`.
    if varlen_attn is None:
        return {}
    parameters = inspect.signature(varlen_attn).parameters
    kwargs = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    return kwargs | ({"enable_gqa": True} if "enable_gqa" in parameters else {})


_VARLEN_KWARGS = _varlen_kwargs()


def varlen_packed_attention(q_1HTD, k_1KTD, v_1KTD, packed: PackedSegments) -> torch.Tensor:
    """The whole packed row in one variable-length flash-attention call (same mask as
    `segment_attention`). Traceable by `torch.compile` when the layout was made beforehand."""
    layout = packed.varlen if packed.varlen is not None else VarlenLayout.of(packed.segments, q_1HTD.device)
    q_THD, k_TKD, v_TKD = (x[0].transpose(0, 1) for x in (q_1HTD, k_1KTD, v_1KTD))
    if layout.key_index is not None:
        k_TKD, v_TKD = k_TKD[layout.key_index], v_TKD[layout.key_index]
    out_THD = varlen_attn(q_THD.contiguous(), k_TKD.contiguous(), v_TKD.contiguous(), layout.cu_q, layout.cu_k,
                          layout.max_q, layout.max_k, **_VARLEN_KWARGS)
    return out_THD.transpose(0, 1)[None]  # (1, H, T, DV)


def varlen_applies(q_1HTD, v_1KTD) -> bool:
    """Flash attention's conditions: CUDA, half precision, the same q/k and v head dims."""
    return (varlen_attn is not None and USE_VARLEN and q_1HTD.is_cuda and q_1HTD.dtype in (torch.bfloat16, torch.float16)
            and q_1HTD.shape[-1] == v_1KTD.shape[-1])


USE_VARLEN = True
"""Fast mode on CUDA: variable-length flash attention for packed rows (tests switch it off to
compare with the segment loop)."""


def packed_attention_fast(attention: Callable, q_1HTD, k_1KTD, v_1KTD, position_ids_1T,
                          packed: PackedSegments) -> torch.Tensor:
    """Fast mode: one variable-length flash-attention call on CUDA (traced into a compiled layer:
    no graph break), else FlexAttention when enabled or the segment loop (both run eagerly)."""
    if varlen_applies(q_1HTD, v_1KTD):
        return varlen_packed_attention(q_1HTD, k_1KTD, v_1KTD, packed)
    return _packed_attention_eager(attention, q_1HTD, k_1KTD, v_1KTD, position_ids_1T, packed)


@torch.compiler.disable
def _packed_attention_eager(attention: Callable, q_1HTD, k_1KTD, v_1KTD, position_ids_1T,
                            packed: PackedSegments) -> torch.Tensor:
    if USE_FLEX and q_1HTD.is_cuda and q_1HTD.shape[-1] == v_1KTD.shape[-1]:
        return flex_packed_attention(q_1HTD, k_1KTD, v_1KTD, packed)
    return segment_attention(attention, q_1HTD, k_1KTD, v_1KTD, position_ids_1T, packed)
