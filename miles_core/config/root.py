"""The root config: `MilesConfig` (the whole recipe) and how a recipe becomes one.

A recipe TOML file mirrors `MilesConfig`; `load_config` reads it (with `extends`), applies the
`section.key=value` overrides, fills eval datasets from the top-level sections and validates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from miles_core.config.algo import AlgoConfig
from miles_core.config.sections import (
    AlignmentConfig,
    DataConfig,
    EngineConfig,
    EvalConfig,
    LoopConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    SamplingConfig,
)
from miles_core.config.train import SyncConfig, TrainConfig
from miles_core.config.tree import apply_overrides, build, deep_merge, load_recipe
from miles_core.config.tree import check as _check


@dataclass(frozen=True, kw_only=True)
class MilesConfig:
    """The whole recipe. Sections are handed to their components one by one."""

    description: str = ""
    """One line shown by `miles recipes list`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)

    def __post_init__(self) -> None:
        if self.alignment.true_on_policy:
            self._check_true_on_policy()
        _check(self.train.routing_replay != "rollout" or self.engine.return_routed_experts,
               "train.routing_replay = 'rollout' replays the engine's routing: set engine.return_routed_experts = true")
        _check(self.train.qat == "off" or self.sync.quantize != "int4"
               or self.sync.quantize_group_size == self.train.qat_group_size,
               f"train.qat_group_size ({self.train.qat_group_size}) must equal sync.quantize_group_size "
               f"({self.sync.quantize_group_size}): the engine must round as the trainer does")
        if self.loop.mode == "async" or self.rollout.partial:
            self._check_off_policy()
        if self.engine.ranks == "all":
            self._check_engine_on_every_rank()
        if self.engine.colocate:
            _check(self.loop.mode == "sync", "engine.colocate takes turns on the GPUs (generate, then train): "
                   "needs loop.mode = 'sync', got 'async'")
            _check(self.train.backend in ("native", "fsdp"), "engine.colocate offloads the optimizer of "
                   f"train.backend 'native' or 'fsdp', got '{self.train.backend}'")

    @property
    def rollout_lag(self) -> int:
        """Rollout steps generation runs ahead of training: 0 in sync mode; in async mode the most
        that keeps every trained token within `loop.max_staleness` weight versions, where one
        rollout step is `train.num_steps_per_rollout` versions and a partial prefix carried over
        unmasked lags one rollout step more."""
        if self.loop.mode == "sync":
            return 0
        carried = int(self.rollout.partial and not self.rollout.mask_offpolicy_prefix)
        return self.loop.max_staleness // self.train.num_steps_per_rollout - carried

    def _check_off_policy(self) -> None:
        """Async mode and unmasked partial prefixes train on tokens of older weights: they need
        an importance-sampling correction, and async mode a staleness bound that allows overlap."""
        what = "loop.mode = 'async'" if self.loop.mode == "async" else "rollout.partial (prefixes unmasked)"
        needs_correction = self.loop.mode == "async" or not self.rollout.mask_offpolicy_prefix
        _check(not needs_correction or self.algo.use_tis or self.algo.use_rs,
               f"{what} trains on tokens sampled by older weights: set algo.use_tis = true (TIS; algo.tis_mode = "
               "'mask' for MIS) or algo.use_rs = true")
        if self.loop.mode == "async":
            steps = self.train.num_steps_per_rollout
            carried = self.rollout.partial and not self.rollout.mask_offpolicy_prefix
            why = " and an unmasked partial prefix lags one rollout step more (or set rollout.mask_offpolicy_prefix)"
            _check(self.rollout_lag >= 1,
                   f"loop.mode = 'async' needs loop.max_staleness >= {steps * (1 + carried)}, got "
                   f"{self.loop.max_staleness}: one rollout step is train.num_steps_per_rollout = {steps} weight "
                   f"versions{why if carried else ''}")
        if self.rollout.partial:
            size = self.algo.over_sampling_batch_size
            _check(size > self.rollout.batch_size,
                   f"rollout.partial needs algo.over_sampling_batch_size > rollout.batch_size = "
                   f"{self.rollout.batch_size} (more groups in flight than a step trains), got {size}")
            _check(not self.rollout.agentic,
                   "rollout.partial does not apply to generate functions (rollout.generate_function, "
                   "rollout.environment, rollout.tools): continuing an aborted multi-turn sample is not implemented")

    def _check_engine_on_every_rank(self) -> None:
        """An engine in every trainer rank's process takes FSDP's gathered weights as they come and
        answers whole generate calls between trainer calls: no launched servers, no streaming
        generation (partial or agentic rollouts), no background thread (async), no quantised sync."""
        needs = [("engine.backend", "native", self.engine.backend), ("engine.launch", False, self.engine.launch),
                 ("train.backend", "fsdp", self.train.backend), ("loop.mode", "sync", self.loop.mode),
                 ("rollout.partial", False, self.rollout.partial), ("sync.quantize", "off", self.sync.quantize)]
        for key, wanted, got in needs:
            _check(got == wanted, f"engine.ranks = 'all' needs {key} = {wanted!r}, got {got!r}")
        _check(self.sync.transport in ("auto", "inprocess"),
               f"engine.ranks = 'all' needs sync.transport = 'auto' or 'inprocess', got '{self.sync.transport}'")
        _check(not self.rollout.agentic, "engine.ranks = 'all' does not apply to generate functions "
               "(rollout.generate_function, rollout.environment, rollout.tools)")

    def _check_true_on_policy(self) -> None:
        """Bitwise-equal log-probs need the same kernels, the same dtype on both sides and an
        unfiltered sampling distribution (the trainer scores the full softmax)."""
        _check(self.alignment.mode == "invariant",
               f"alignment.true_on_policy needs alignment.mode = 'invariant', got '{self.alignment.mode}'")
        _check(self.train.backend == "native",
               f"alignment.true_on_policy needs train.backend = 'native' (the engine's kernels), got '{self.train.backend}'")
        _check(self.train.compute_dtype == self.model.dtype,
               f"alignment.true_on_policy needs train.compute_dtype == model.dtype, got "
               f"'{self.train.compute_dtype}' and '{self.model.dtype}'")
        _check(self.sampling.top_k == -1 and self.sampling.top_p == 1.0,
               f"alignment.true_on_policy needs sampling.top_k = -1 and top_p = 1, got {self.sampling.top_k} "
               f"and {self.sampling.top_p}")
        _check(self.train.precision != "fp8",
               "alignment.true_on_policy needs train.precision = 'bf16' (FP8 training GEMMs round differently "
               "from the engine's), got 'fp8'")


def load_config(recipe: str, overrides: list[str] | None = None) -> MilesConfig:
    """Recipe name or path + `section.key=value` overrides -> validated `MilesConfig`."""
    raw = load_recipe(recipe)
    raw = apply_overrides(raw, list(overrides or []), MilesConfig)
    raw = inherit_eval_defaults(raw)
    return build(MilesConfig, raw)


_DATA_SOURCE_KEYS = ("path", "task", "max_prompts")
_TASK_TABLES = ("arithmetic",)
"""`DataConfig` tables of built-in tasks: an eval dataset that fills one defines that task."""


def inherit_eval_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill every `[[eval.datasets]]` entry's `data`, `sampling` and `reward` tables with the keys
    it leaves out from the top-level sections, so a held-out set is formatted, sampled and scored
    like training unless it says otherwise. The data source (`path`, `task`, `max_prompts`) is
    taken as one unit: a dataset that names `path` or `task` inherits none of the three; one that
    fills a task's table (`[eval.datasets.data.arithmetic]`) names that task and never inherits
    `path` (it would read the training file).
    Idempotent, so a resolved config reloads unchanged."""
    section = raw.get("eval")
    if not isinstance(section, dict) or not isinstance(section.get("datasets"), list):
        return raw  # absent, or a type error that `build` reports with its key
    datasets = [_inherit(d, raw) if isinstance(d, dict) else d for d in section["datasets"]]
    return {**raw, "eval": {**section, "datasets": datasets}}


def _inherit(dataset: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    out = dict(dataset)
    for name in ("data", "sampling", "reward"):
        base, own = raw.get(name, {}), dataset.get(name, {})
        if not isinstance(base, dict) or not isinstance(own, dict):
            continue
        if name == "data" and ("path" in own or "task" in own):
            base = {k: v for k, v in base.items() if k not in _DATA_SOURCE_KEYS}
        elif name == "data" and (tables := [t for t in _TASK_TABLES if t in own]):
            base = {k: v for k, v in base.items() if k != "path"}  # never the training file
            own = {**own, "task": tables[0]}
        out[name] = deep_merge(base, own)
    return out
