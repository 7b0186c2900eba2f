"""Packed trainer forward: a micro-batch's sequences back to back in one row, no padding.

The padded forward (`batch.response_hidden_states`) right-pads every sequence to the longest of
its micro-batch, so the model computes (samples x longest) tokens; the packed forward computes
only the real ones. The row (B = 1, T tokens) carries per-token position ids that restart at 0
for each sequence, and a `kernels.packed.PackedSegments` in the KV cache's place keeps attention
within sequences. Linear layers, norms and the MLP are per-token, so nothing else changes.

A sample of length L with R response tokens is fed its first L - 1 tokens (the last token
predicts nothing, the padded forward feeds it and drops its output). With
`share_prompt_prefix`, a prompt shared by several samples is fed once: the row holds the prompt,
then each sample's response tokens as a branch that attends to the prompt and to itself (a tree
mask), so the prompt's work is done once per micro-batch, as in `batch.shared_prefix_hidden_states`
but without a KV cache, its row copies or any padding. A prompt with one sample is packed plainly.

Exactness: in `invariant` mode each segment's attention is the engine's per-row kernel (on CUDA
one launch for all segments, each on its own call's tiles) and every other op is row-invariant, so the packed log-probs are bitwise equal to the padded ones (zero KL is
kept). In `fast` mode the vendor kernels see other shapes, so results agree to rounding (fp32:
~1e-6; `tests/train/test_packing.py` states the tolerances).

MoE routing replay (R3): the routing context is laid out in row order from per-sample pieces, and
the routers' own choices are read back per sample as (L - 1, layers, top-k), as the engine records.

Shape legend: T tokens of the row, E hidden, N response tokens of all samples (sample-major).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from miles_core.kernels.packed import PackedSegments
from miles_core.utils.device import to_device
from miles_core.train.batch import _prompt_slots, _token_log_probs, has_room, prompt_groups
from miles_core.train.routing_replay import RoutingPlan


@dataclass
class PackedRow:
    """One packed row under construction: token ids, positions, attention segments, the routing
    pieces (sample, start, count, offset) and per sample the row indices that predict its response."""

    ids: list[torch.Tensor] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)
    pieces: dict[int, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    predict: dict[int, torch.Tensor] = field(default_factory=dict)
    length: int = 0

    def add(self, sample: int, tokens: torch.Tensor, start: int, prefix: tuple[int, int] = (0, 0)) -> int:
        """Append `tokens` (positions start, start + 1, ...) as a segment; returns its row offset."""
        offset, count = self.length, len(tokens)
        if count:
            self.ids.append(tokens)
            self.positions.append(torch.arange(start, start + count))
            self.segments.append((offset, offset + count, *prefix))
            self.pieces.setdefault(sample, []).append((sample, start, count, offset))
            self.length += count
        return offset


def pack_row(tokens: Sequence[torch.Tensor], response_lengths: Sequence[int], share_prompt_prefix: bool,
             routing: RoutingPlan | None = None) -> PackedRow:
    """Lay out the samples in one row; samples sharing a prompt (and, under replay, its recorded
    routing) share one prompt segment when `share_prompt_prefix`."""
    row = PackedRow()
    prompts = [t[: len(t) - r] for t, r in zip(tokens, response_lengths)]
    if share_prompt_prefix:
        slot_of, _ = _prompt_slots(prompts, routing)
    else:
        slot_of = list(range(len(tokens)))
    members: dict[int, list[int]] = {}
    for b, slot in enumerate(slot_of):
        members.setdefault(slot, []).append(b)
    for group in members.values():
        if len(group) == 1:
            b = group[0]
            offset = row.add(b, tokens[b][:-1], 0)
            row.predict[b] = torch.arange(offset + len(prompts[b]) - 1, offset + len(tokens[b]) - 1)
            continue
        P = len(prompts[group[0]])
        prompt_at = row.add(group[0], prompts[group[0]], 0)
        for b in group:
            if b != group[0]:  # the prompt's routing pieces belong to every sample of the group
                row.pieces.setdefault(b, []).append((b, 0, P, prompt_at))
            response_at = row.add(b, tokens[b][P:-1], P, prefix=(prompt_at, prompt_at + P))
            row.predict[b] = torch.cat([torch.tensor([prompt_at + P - 1]),
                                        torch.arange(response_at, response_at + response_lengths[b] - 1)])
    return row


def packed_hidden_states(model: nn.Module, tokens: Sequence[torch.Tensor], response_lengths: Sequence[int],
                         routing: RoutingPlan | None = None, *,
                         share_prompt_prefix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Same result as `batch.response_hidden_states`: (N, E) hidden states that predict the N
    response tokens, and those tokens (N,), from one packed forward."""
    device = model.lm_head.weight.device
    row = pack_row(tokens, response_lengths, share_prompt_prefix, routing)
    ids_1T = to_device(torch.cat(row.ids)[None], device)
    positions_1T = to_device(torch.cat(row.positions)[None], device)
    pieces = [p for sample in sorted(row.pieces) for p in row.pieces[sample]]
    # Replay pieces: a shared prompt's routing is written once (its first sample's), the rest
    # only repeat it; the context fills each row offset from one of them.
    ctx = routing.packed_context(pieces, row.length, device) if routing else None
    packed = PackedSegments.for_device(row.segments, device)
    hidden_1TE = model(ids_1T, positions_1T, packed, routing=ctx)
    if routing:
        ids_1TLK = ctx.stacked()
        routing.recorded = [np.concatenate([ids_1TLK[0, off : off + n] for _, _, n, off in row.pieces[b]])
                            for b in range(len(tokens))]
    index = to_device(torch.cat([row.predict[b] for b in range(len(tokens))]), device)
    targets = to_device(torch.cat([t[len(t) - r :] for t, r in zip(tokens, response_lengths)]), device)
    return hidden_1TE[0, index], targets


def packed_log_probs(model: nn.Module, tokens: Sequence[torch.Tensor], response_lengths: Sequence[int], *,
                     temperature: float, chunk_size: int, routing: RoutingPlan | None = None,
                     share_prompt_prefix: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-sample (log-probs, entropies) of the response tokens, from one packed forward."""
    hidden_NE, targets_N = packed_hidden_states(model, tokens, response_lengths, routing,
                                                share_prompt_prefix=share_prompt_prefix)
    return _token_log_probs(model, hidden_NE, targets_N, response_lengths, temperature, chunk_size)


def packed_micro_batches(tokens: Sequence[torch.Tensor], response_lengths: Sequence[int], max_tokens: int,
                         share_prompt_prefix: bool, max_samples: int = 0) -> list[list[int]]:
    """Whole samples, in order, so each packed row holds at most `max_tokens` tokens (a sample
    longer than that gets a row of its own) and, when `max_samples` > 0, at most that many samples. With `share_prompt_prefix` prompt groups stay
    together and a group's prompt counts once per row (under R3 a prompt whose samples carry
    different recorded routing is fed once per routing, so a row may then exceed the budget)."""
    groups = prompt_groups(tokens, response_lengths) if share_prompt_prefix else [[i] for i in range(len(tokens))]
    batches: list[list[int]] = []
    used = 0
    for group in groups:
        prompt_in_row = False
        for i in group:
            cost = response_lengths[i] - 1 + (0 if prompt_in_row else len(tokens[i]) - response_lengths[i])
            if batches and has_room(batches[-1], max_samples) and used + cost <= max_tokens:
                batches[-1].append(i)
                used += cost
            else:
                batches.append([i])
                used = len(tokens[i]) - 1
            prompt_in_row = True
    return batches
