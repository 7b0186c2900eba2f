"""Rollout engines behind the `RolloutEngine` protocol, looked up by `engine.backend`.

`ENGINE_BACKENDS` maps a backend name to a factory `(EngineConfig, LoadedModel) -> RolloutEngine`.
Every caller (training, `miles rollout`, evaluation, align-check) builds its engine through
`build_engine`; a new backend registers here and nowhere else. `native` runs in this process;
`sglang` is the HTTP client of SGLang servers or `miles serve` (engine/http.py).
"""

from __future__ import annotations

from collections.abc import Callable

from miles_core.checkpoint.loading import LoadedModel
from miles_core.config import EngineConfig
from miles_core.engine.http import SGLangHttpEngine
from miles_core.engine.native import NativeEngine
from miles_core.engine.protocol import RolloutEngine
from miles_core.engine.sglang_launch import launch_servers
from miles_core.errors import one_of

EngineFactory = Callable[[EngineConfig, LoadedModel], RolloutEngine]


def _native(cfg: EngineConfig, loaded: LoadedModel) -> RolloutEngine:
    return NativeEngine(loaded.model, loaded.tokenizer, cfg, eos_token_ids=loaded.eos_token_ids,
                        max_position_embeddings=loaded.max_position_embeddings)


def _sglang(cfg: EngineConfig, loaded: LoadedModel) -> RolloutEngine:
    urls = launch_servers(cfg, str(loaded.path)) if cfg.launch else cfg.urls
    topk = int(loaded.hf_config.get("num_experts_per_tok", 0)) if getattr(loaded.model, "num_moe_layers", 0) else 0
    return SGLangHttpEngine(cfg, urls=urls, tokenizer=loaded.tokenizer, routed_experts_topk=topk,
                            max_position_embeddings=loaded.max_position_embeddings)


ENGINE_BACKENDS: dict[str, EngineFactory] = {"native": _native, "sglang": _sglang}


def build_engine(cfg: EngineConfig, loaded: LoadedModel) -> RolloutEngine:
    """The engine named by `cfg.backend`, serving the already loaded model."""
    if cfg.backend not in ENGINE_BACKENDS:
        raise one_of("engine.backend", cfg.backend, tuple(ENGINE_BACKENDS))
    return ENGINE_BACKENDS[cfg.backend](cfg, loaded)
