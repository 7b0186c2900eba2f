"""Rollout engines behind the `RolloutEngine` protocol, looked up by `engine.backend`.

`ENGINE_BACKENDS` maps a backend name to a factory `(EngineConfig, LoadedModel) -> RolloutEngine`.
Every caller (training, `miles rollout`, evaluation, align-check) builds its engine through
`build_engine`; a new backend registers here and nowhere else. `native` runs in this process;
`sglang` is the HTTP client of SGLang servers or `miles serve` (engine/http.py), which with
`engine.launch` first starts those servers on GPUs of their own (engine/servers.py).
"""

from __future__ import annotations

from collections.abc import Callable

from miles_core.checkpoint.loading import LoadedModel
from miles_core.config import EngineConfig
from miles_core.engine.http import SGLangHttpEngine
from miles_core.engine.native import NativeEngine
from miles_core.engine.protocol import RolloutEngine
from miles_core.engine.ray_servers import in_ray_worker, launch_ray_servers
from miles_core.engine.servers import LaunchContext, launch_servers
from miles_core.errors import one_of

EngineFactory = Callable[..., RolloutEngine]
"""`(EngineConfig, LoadedModel) -> RolloutEngine`; with `engine.launch` (backend `sglang`) it is also
handed the run's `LaunchContext`."""


def _native(cfg: EngineConfig, loaded: LoadedModel) -> RolloutEngine:
    return NativeEngine(loaded.model, loaded.tokenizer, cfg, eos_token_ids=loaded.eos_token_ids,
                        max_position_embeddings=loaded.max_position_embeddings)


def _sglang(cfg: EngineConfig, loaded: LoadedModel, context: LaunchContext | None = None) -> RolloutEngine:
    dtype = loaded.model.lm_head.weight.dtype
    fleet = None
    if cfg.launch:  # under `--ray` this process is a Ray actor: Ray places the servers
        launch = launch_ray_servers if in_ray_worker() else launch_servers
        cfg, fleet = launch(cfg, str(loaded.path), dtype=str(dtype).removeprefix("torch."),
                            on_gpu=loaded.device.type == "cuda", context=context or LaunchContext())
    topk = int(loaded.hf_config.get("num_experts_per_tok", 0)) if getattr(loaded.model, "num_moe_layers", 0) else 0
    try:
        return SGLangHttpEngine(cfg, urls=fleet.urls if fleet else cfg.urls, tokenizer=loaded.tokenizer,
                                routed_experts_topk=topk, max_position_embeddings=loaded.max_position_embeddings,
                                owned=fleet)
    except BaseException:
        if fleet is not None:
            fleet.stop()
        raise


ENGINE_BACKENDS: dict[str, EngineFactory] = {"native": _native, "sglang": _sglang}


def build_engine(cfg: EngineConfig, loaded: LoadedModel, context: LaunchContext | None = None) -> RolloutEngine:
    """The engine named by `cfg.backend`, serving the already loaded model; `context`: what
    launched servers need from the run (trainer GPUs, weight folder), defaults otherwise."""
    if cfg.backend not in ENGINE_BACKENDS:
        raise one_of("engine.backend", cfg.backend, tuple(ENGINE_BACKENDS))
    factory = ENGINE_BACKENDS[cfg.backend]
    if cfg.launch:  # backend 'sglang' (the config checks it): its servers go where the run says
        return factory(cfg, loaded, context or LaunchContext())
    return factory(cfg, loaded)


def close_engine(engine: RolloutEngine | None) -> None:
    """Release what an engine holds beyond memory: the HTTP client's connections and the servers
    it launched (`engine.launch`). The native engine holds nothing of the kind."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()
