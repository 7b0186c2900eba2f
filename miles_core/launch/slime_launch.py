"""Reading a slime/miles launch (`python train.py --rollout-batch-size 512 ...`): the flags parsed
against the tables of `slime_flags.py`, slime's defaults applied where the recipe is silent, the
config resolved (recipe < slime defaults < flags < CLI options and --set), and the trainer rank
count of a launch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from miles_core.config import MilesConfig, inherit_eval_defaults
from miles_core.config.tree import apply_overrides, build, load_recipe
from miles_core.errors import MilesError, did_you_mean
from miles_core.launch.slime_flags import (
    FLAGS,
    FlagRefused,
    NOTED,
    ONLY_ONE,
    PLACEMENT,
    REJECTED,
    REJECTED_PREFIXES,
    SLIME_DATA_DEFAULTS,
    SLIME_DEFAULTS,
    TYPER_FLAGS,
)


@dataclass
class SlimeLaunch:
    """What the flags of one launch line ask for."""

    values: dict[str, Any] = field(default_factory=dict)
    """Recipe key -> value, in flag order (later flags win)."""
    given: dict[str, Any] = field(default_factory=dict)
    """Flag -> parsed value, as typed."""
    notes: list[str] = field(default_factory=list)

    def overrides(self) -> list[str]:
        return [f"{key}={json.dumps(value)}" for key, value in self.values.items()]


def parse_slime_flags(argv: list[str]) -> SlimeLaunch:
    """Read `--flag value` / `--flag=value` / `--switch` items; every refused flag in one error."""
    launch, refused, i = SlimeLaunch(), [], 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        i += 1
        if not name.startswith("--"):
            refused.append(f"'{argv[i - 1]}': not a flag (flags start with --)")
            continue
        kind = _kind(name)
        raw: Any = inline if eq else None
        if raw is None and kind is not bool:
            count = _count_values(argv, i) if kind is list else min(1, _count_values(argv, i))
            raw = argv[i:i + count] if kind is list else (argv[i] if count else None)
            i += count
        try:
            _apply(launch, name, raw)
        except FlagRefused as err:
            refused.append(str(err))
    if "--eps-clip-high" in launch.given:
        launch.values["algo.eps_clip_high"] = launch.given["--eps-clip-high"]
    if refused:
        raise MilesError("slime flags miles cannot run:\n  " + "\n  ".join(refused))
    return launch


def _kind(name: str) -> type | None:
    if name in FLAGS:
        return FLAGS[name].type
    if name in NOTED:
        return NOTED[name][0]
    if name in ONLY_ONE or name in PLACEMENT:
        return int
    return list  # refused below, with the values that follow it


def _count_values(argv: list[str], start: int) -> int:
    end = start
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    return end - start


def _apply(launch: SlimeLaunch, name: str, raw: Any) -> None:
    if name in REJECTED:
        raise FlagRefused(f"{name}: {REJECTED[name]}")
    for prefix, message in REJECTED_PREFIXES.items():
        if name.startswith(prefix):
            raise FlagRefused(f"{name}: {message}")
    if name in ONLY_ONE:
        if _convert(name, raw, int) != 1:
            raise FlagRefused(f"{name} {raw}: {ONLY_ONE[name]}")
        launch.notes.append(f"{name} 1: what miles does (one device)")
        return
    if name in PLACEMENT:
        value = _convert(name, raw, int)
        if value < 1:
            raise FlagRefused(f"{name} {raw}: must be >= 1")
        launch.given[name] = value
        return
    if name in NOTED:
        _convert(name, raw, NOTED[name][0])
        launch.notes.append(f"{name}: {NOTED[name][1]}")
        return
    if name not in FLAGS:
        known = [*FLAGS, *REJECTED, *NOTED, *ONLY_ONE, *PLACEMENT, *TYPER_FLAGS]
        raise FlagRefused(f"{name}: neither a miles train option nor a slime flag miles knows{did_you_mean(name, known)}")
    flag = FLAGS[name]
    value = _convert(name, raw, flag.type)
    launch.given[name] = value
    launch.values.update(flag.apply(value))


def _convert(name: str, raw: Any, kind: type) -> Any:
    if kind is bool:
        if raw is None:
            return True
        if str(raw).lower() in ("true", "false"):
            return str(raw).lower() == "true"
        raise FlagRefused(f"{name}: a switch takes no value, got '{raw}'")
    if raw is None or raw == []:
        raise FlagRefused(f"{name}: expects a value")
    if kind is list:
        return list(raw) if isinstance(raw, list) else [raw]
    try:
        return kind(raw)
    except ValueError:
        raise FlagRefused(f"{name}: expects {kind.__name__}, got '{raw}'") from None


def apply_slime_defaults(raw: dict[str, Any], launch: SlimeLaunch) -> tuple[dict[str, Any], list[str]]:
    """slime's defaults for keys the recipe (`raw`) and the flags leave unset; the keys used."""
    defaults = dict(SLIME_DEFAULTS)
    if "data.path" in launch.values:
        defaults.update(SLIME_DATA_DEFAULTS)
    used = [key for key in defaults if key not in launch.values and not _has(raw, key)]
    overrides = [f"{key}={json.dumps(defaults[key])}" for key in used]
    return apply_overrides(raw, overrides, MilesConfig), [f"{k}={json.dumps(defaults[k])}" for k in used]


def steps_for_global_batch(launch: SlimeLaunch, rollout_batch_size: int, n_samples: int) -> int | None:
    """train.num_steps_per_rollout from --global-batch-size (None if not given), checked as slime does."""
    gbs = launch.given.get("--global-batch-size")
    if gbs is None:
        return None
    total = rollout_batch_size * n_samples
    if gbs <= 0 or total % gbs:
        raise MilesError(f"--global-batch-size {gbs} must divide rollout_batch_size * n_samples_per_prompt = "
                         f"{rollout_batch_size} * {n_samples} = {total}")
    steps = total // gbs
    given = launch.given.get("--num-steps-per-rollout")
    if given is not None and given != steps:
        raise MilesError(f"--num-steps-per-rollout {given} disagrees with --global-batch-size {gbs}: "
                         f"{total} samples / {gbs} = {steps} steps")
    return steps


def trainer_ranks(launch: SlimeLaunch, nproc_per_node: int | None, use_ray: bool) -> int:
    """How many trainer ranks a launch asks for: nodes x ranks per node (--nproc-per-node or
    slime's --actor-num-gpus-per-node; they must agree when both are given)."""
    nodes = launch.given.get("--actor-num-nodes", 1)
    per_node = launch.given.get("--actor-num-gpus-per-node")
    if per_node is not None and nproc_per_node is not None and per_node != nproc_per_node:
        raise MilesError(f"--nproc-per-node {nproc_per_node} and --actor-num-gpus-per-node {per_node} disagree: "
                         "keep one")
    if nodes > 1 and not use_ray:
        raise MilesError(f"--actor-num-nodes {nodes} places trainer ranks on several nodes: add --ray (and start "
                         "the cluster with `ray start`)")
    return nodes * (per_node or nproc_per_node or 1)


def placement_overrides(num_gpus: int | None, per_engine: int | None, colocate: bool) -> list[str]:
    """`miles train --rollout-num-gpus / --rollout-num-gpus-per-engine / --colocate` as recipe
    overrides: the slime flags' own mapping, without the slime defaults a slime launch brings."""
    given = {"--rollout-num-gpus": num_gpus, "--rollout-num-gpus-per-engine": per_engine,
             "--colocate": True if colocate else None}
    values: dict[str, Any] = {}
    for name, value in given.items():
        if value is not None:
            values.update(FLAGS[name].apply(value))
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def _has(raw: dict[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def resolve_config(recipe: str | None, flags: list[str], overrides: list[str]):
    """(MilesConfig, SlimeLaunch, slime defaults used) of a launch: recipe (or miles' defaults)
    < slime defaults where the recipe is silent < slime flags < `overrides` (CLI options, --set)."""
    launch = parse_slime_flags(flags)
    raw = load_recipe(recipe) if recipe else {}
    used: list[str] = []
    if launch.given or launch.notes:
        raw, used = apply_slime_defaults(raw, launch)
    tail = list(overrides)
    cfg = _build(raw, launch.overrides() + tail, needs_sources=recipe is None)
    steps = steps_for_global_batch(launch, cfg.rollout.batch_size, cfg.sampling.n_samples_per_prompt)
    if steps is not None:
        cfg = _build(raw, launch.overrides() + [f"train.num_steps_per_rollout={steps}"] + tail, needs_sources=False)
    return cfg, launch, used


def _build(raw: dict[str, Any], overrides: list[str], *, needs_sources: bool):
    raw = apply_overrides(raw, overrides, MilesConfig)
    if needs_sources:
        missing = [flag for flag, keys in (("--hf-checkpoint", ("model.source",)),
                                           ("--prompt-data", ("data.path", "data.task"))) if not any(
            _has(raw, key) and raw_value(raw, key) for key in keys)]
        if missing:
            raise MilesError("miles train needs --recipe NAME, or --hf-checkpoint and --prompt-data to start "
                             f"from miles' defaults (missing: {', '.join(missing)})")
    return build(MilesConfig, inherit_eval_defaults(raw))


def raw_value(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node[part]
    return node
