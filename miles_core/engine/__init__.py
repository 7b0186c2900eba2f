"""Rollout engines behind the `RolloutEngine` protocol (native in-process now; HTTP later)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from miles_core.config import EngineConfig

if TYPE_CHECKING:
    from miles_core.engine.protocol import RolloutEngine
    from miles_core.models.loading import LoadedModel


def build_engine(cfg: EngineConfig, loaded: LoadedModel) -> RolloutEngine:
    """The engine named by `cfg.backend`, serving the already loaded model."""
    from miles_core.engine.native import NativeEngine

    return NativeEngine(loaded.model, loaded.tokenizer, cfg, eos_token_ids=loaded.eos_token_ids,
                        max_position_embeddings=loaded.max_position_embeddings)
