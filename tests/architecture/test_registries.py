"""Engines and trainers are built through their registries by every caller, so a backend
registered there is what training, `miles rollout`, evaluation and align-check get."""

from __future__ import annotations

import dataclasses

import pytest

from miles_core.config import AlgoConfig, EngineConfig, TrainConfig, load_config
from miles_core.engine import ENGINE_BACKENDS, build_engine
from miles_core.errors import MilesError
from miles_core.rl.loop import run_training
from miles_core.train import TRAIN_BACKENDS, build_trainer


def _with_backend(cfg, name: str):
    cfg = dataclasses.replace(cfg)
    object.__setattr__(cfg, "backend", name)  # the recipe schema lists only shipped backends
    return cfg


def test_unknown_backends_are_refused_with_the_registered_ones():
    with pytest.raises(MilesError, match="unknown engine.backend 'vllm'; expected one of: native, sglang"):
        build_engine(_with_backend(EngineConfig(), "vllm"), loaded=None)
    with pytest.raises(MilesError, match="unknown train.backend 'deepspeed'; expected one of: fsdp, megatron, native"):
        build_trainer(_with_backend(TrainConfig(), "deepspeed"), AlgoConfig(), model=None, temperature=1.0, total_steps=1)


def test_the_loop_builds_engine_and_trainer_through_the_registries(tmp_path, monkeypatch):
    built = []
    native_engine, native_trainer = ENGINE_BACKENDS["native"], TRAIN_BACKENDS["native"]

    def engine(cfg, loaded):
        built.append("engine")
        return native_engine(cfg, loaded)

    def trainer(cfg, algo, model, **kw):
        built.append("trainer")
        return native_trainer(cfg, algo, model, **kw)

    monkeypatch.setitem(ENGINE_BACKENDS, "native", engine)
    monkeypatch.setitem(TRAIN_BACKENDS, "native", trainer)
    run_training(load_config("tiny", ["loop.num_rollout=1"]), tmp_path / "run")
    assert built == ["engine", "trainer"]
