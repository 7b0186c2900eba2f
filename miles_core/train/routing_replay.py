"""Rollout Routing Replay (R3) on the trainer side, and routing agreement.

The engine records, per sample, the top-k experts of every token at every MoE layer:
int32 (len(tokens) - 1, num_moe_layers, topk) in `Sample.rollout_routed_experts` (the last
token is never fed back, so it has no routing). `train.routing_replay` chooses what the
trainer's MoE layers use:
- `off`: their own router's choice;
- `rollout`: the engine's recorded choice (R3), so both sides run the same experts;
- `record`: their own choice in the first (old log-prob) pass, replayed in the later optimizer
  steps of the same rollout, so an update cannot change which experts the ratio compares.
In every mode the router's own choice is also recorded, and compared with the engine's to give
the routing agreement (fraction of (token, layer, slot) equal, ids sorted within a token).

`RoutingPlan` carries this through a trainer forward: it builds the `RoutingContext` for each
model call from per-sample arrays, checks that every replay entry was used exactly once, and
turns the recorded (B, T, K) tensors back into per-sample arrays; a packed forward (one row of
many samples, `train/packing.py`) describes where each sample's positions sit in the row. Positions that have no
recorded routing (a sample's last token, padding) replay experts 0..K-1: they influence no
log-prob, because attention is causal and those positions predict nothing that is trained.

Shape legend: B rows, T positions, L MoE layers, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from miles_core.errors import MilesError
from miles_core.models.routing import RoutingContext


def moe_shape(model) -> tuple[int, int]:
    """(MoE layers, top-k) of a model; (0, 0) for dense models."""
    layers = int(getattr(model, "num_moe_layers", 0))
    return (layers, int(model.args.num_experts_per_tok)) if layers else (0, 0)


def check_routed_shape(routed: np.ndarray, num_tokens: int, layers: int, topk: int, where: str) -> None:
    expected = (num_tokens - 1, layers, topk)
    if tuple(routed.shape) != expected:
        raise MilesError(f"{where}: routed experts have shape {tuple(routed.shape)}, expected {expected} "
                         "(len(tokens) - 1, MoE layers, top-k)")


@dataclass
class RoutingPlan:
    """Routing for one trainer forward over some samples."""

    layers: int
    topk: int
    replay: list[np.ndarray] | None = None
    """Per sample (len - 1, L, K) ids to replay; None lets the routers choose."""
    recorded: list[np.ndarray] = field(default_factory=list)
    """Filled by the forward: per sample, the routers' own choices (len - 1, L, K)."""

    def context(self, rows: list[tuple[int, int, int]], width: int, device) -> RoutingContext:
        """Context for a model call over `len(rows)` rows of `width` positions, where row r shows
        positions [start, start + width) of sample `rows[r] = (sample, start, count)` and only the
        first `count` of them have recorded routing."""
        if self.replay is None:
            return RoutingContext("record")
        ids = torch.arange(self.topk).expand(len(rows), width, self.layers, self.topk).clone()
        for r, (sample, start, count) in enumerate(rows):
            if count > 0:
                ids[r, :count] = torch.from_numpy(self.replay[sample][start : start + count].astype(np.int64))
        ids = ids.to(device)
        return RoutingContext("replay", replay={layer: ids[:, :, layer] for layer in range(self.layers)})

    def packed_context(self, pieces: list[tuple[int, int, int, int]], width: int, device) -> RoutingContext:
        """Context for one packed row of `width` tokens, where `pieces[i] = (sample, start, count,
        offset)` puts positions [start, start + count) of a sample at row offset `offset`."""
        if self.replay is None:
            return RoutingContext("record")
        ids = torch.arange(self.topk).expand(1, width, self.layers, self.topk).clone()
        for sample, start, count, offset in pieces:
            ids[0, offset : offset + count] = torch.from_numpy(self.replay[sample][start : start + count].astype(np.int64))
        ids = ids.to(device)
        return RoutingContext("replay", replay={layer: ids[:, :, layer] for layer in range(self.layers)})


@dataclass
class RoutingAgreement:
    """Counts of (token, layer, slot) where the trainer's router chose what the engine chose."""

    equal: int = 0
    total: int = 0

    def add(self, trainer: np.ndarray, engine: np.ndarray) -> None:
        a, b = np.sort(trainer, axis=-1), np.sort(engine, axis=-1)
        self.equal += int((a == b).sum())
        self.total += a.size

    @property
    def fraction(self) -> float:
        return self.equal / self.total if self.total else 1.0
