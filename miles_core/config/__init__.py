"""Typed configuration: one frozen, keyword-only dataclass per component.

Each component receives only its own section (the engine gets `EngineConfig`, never the whole
recipe). `MilesConfig` is the root that a recipe TOML file mirrors. Values are validated in
`__post_init__` with the field, the bad value and the allowed range. Runtime state (eos ids,
KV block counts, devices actually chosen) lives elsewhere, not here.

  tree.py      recipe files, `extends`, `--set` overrides, dataclass building, TOML dump
  sections.py  the component sections (model, engine, data, sampling, rollout, reward, loop, eval, ...)
  train.py     the trainer side's sections (`[train]`, `[sync]`)
  agent.py     the `[rollout.tools]` section (multi-turn tool use)
  algo.py      the `[algo]` section (advantage estimators, losses, corrections, filters)
  root.py      `MilesConfig` and `load_config`
"""

from miles_core.config.agent import ToolsConfig
from miles_core.config.algo import AlgoConfig
from miles_core.config.root import MilesConfig, inherit_eval_defaults, load_config
from miles_core.config.sections import (
    AlignmentConfig,
    ArithmeticConfig,
    DataConfig,
    DType,
    EngineConfig,
    EvalConfig,
    EvalDatasetConfig,
    LoopConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    SamplingConfig,
)
from miles_core.config.train import SyncConfig, TrainConfig

__all__ = [
    "AlgoConfig", "AlignmentConfig", "ArithmeticConfig", "DataConfig", "DType", "EngineConfig", "EvalConfig",
    "EvalDatasetConfig", "LoopConfig", "MilesConfig", "ModelConfig", "RewardConfig", "RolloutConfig",
    "SamplingConfig", "SyncConfig", "ToolsConfig", "TrainConfig", "inherit_eval_defaults", "load_config",
]
