"""Routing context for MoE layers: record the experts each token was sent to, or replay them.

Rollout Routing Replay (R3): the engine records, for every token at every MoE layer, the top-k
expert ids it chose; the trainer replays exactly those ids so both sides run the same experts.
Under replay the router scores are still computed, and the combine weights are the router's
probabilities gathered at the replayed ids, so the router keeps receiving gradients.

A model's forward takes an optional `RoutingContext`; each MoE layer calls `route(...)` with its
own layer index. Shape legend: B batch, T tokens, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from miles_core.errors import MilesError


@dataclass
class RoutingContext:
    mode: Literal["record", "replay"]
    replay: dict[int, torch.Tensor] = field(default_factory=dict)
    """Replay mode: MoE layer index -> expert ids (B, T, K) to use instead of the router's top-k."""
    recorded: dict[int, torch.Tensor] = field(default_factory=dict)
    """MoE layer index -> the expert ids (B, T, K) the router itself chose (also under replay,
    so routing agreement can be measured in the same forward)."""
    consumed: set[int] = field(default_factory=set)
    """Replay mode: layers whose replay entry was used (each exactly once per forward)."""

    def route(self, layer: int, chosen_BTK: torch.Tensor) -> torch.Tensor:
        """The expert ids a MoE layer must use, given the ids its router chose."""
        self.recorded[layer] = chosen_BTK.detach()  # the router's own choice, in both modes
        if self.mode == "record":
            return chosen_BTK
        if layer not in self.replay:
            raise MilesError(f"routing replay has no entry for MoE layer {layer}; has {sorted(self.replay)}")
        if layer in self.consumed:
            raise MilesError(f"routing replay entry of MoE layer {layer} used twice in one forward")
        ids = self.replay[layer]
        if ids.shape != chosen_BTK.shape:
            raise MilesError(f"routing replay for MoE layer {layer} has shape {tuple(ids.shape)}, "
                             f"expected {tuple(chosen_BTK.shape)}")
        self.consumed.add(layer)
        return ids.to(device=chosen_BTK.device, dtype=chosen_BTK.dtype)

    def check_all_consumed(self) -> None:
        """Replay mode: every entry was used by exactly one layer (call after the forward)."""
        unused = sorted(set(self.replay) - self.consumed)
        if unused:
            raise MilesError(f"routing replay entries for MoE layers {unused} were never used")

    def stacked(self) -> np.ndarray:
        """The routers' own choices of one forward as int32 (B, T, MoE layers, K) on the CPU (one
        transfer for all layers); under replay, first checks every entry was used once."""
        if self.mode == "replay":
            self.check_all_consumed()
        ids = torch.stack([self.recorded[layer] for layer in sorted(self.recorded)], dim=2)
        return ids.to(torch.int32).cpu().numpy()
