"""User hooks named by a dotted path: one resolver, one contract per hook kind.

A path is `package.module:function` or `package.module.function` (an attribute chain after the
colon, `module:Class.method`, also works), imported with importlib from `sys.path`. The resolver
checks that the target exists, is callable and accepts the call its kind makes; every way this
can fail is one `MilesError` line naming the hook kind, the path and the problem. Call sites
check what a hook returns and report a wrong shape with `hook_error`.

Contracts (`HOOKS`), by recipe key:
  algo.reward_post_process        fn(rewards (N,), group_size, **inputs) -> (N,) rewards
  algo.custom_advantage_function  fn(rewards (N,), group_size, **inputs) -> (N,) or (N, T)
  algo.dynamic_filter             fn(rewards (N,), group_size, **inputs) -> (G,) bool, True = keep
  algo.custom_loss_function       fn(cfg, *, log_probs, old_log_probs, advantages, loss_mask)
                                  -> (per-token loss (B, T), stats: dict of (B, T) tensors)
  algo.custom_tis_function        fn(cfg, *, old_log_probs, rollout_log_probs, loss_mask)
                                  -> (weights (B, T), keep (B, T), stats: dict of (B, T) tensors)
  reward.type                     fn(sample) -> float | dict (the reward registry's contract)
  rollout.generate_function       async fn(ctx, sample, sampling) -> Sample | list[Sample]
Hooks that receive `**inputs` must accept keywords they do not use, so new inputs never break
them. Loss and TIS hooks see one micro-batch of whole sequences: per-row reductions are exact.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, fields
from typing import Any, Callable

from miles_core.config import AlgoConfig
from miles_core.errors import MilesError, did_you_mean, one_of


@dataclass(frozen=True)
class HookSpec:
    name: str
    """How messages name this kind of hook, e.g. `advantage hook (algo.custom_advantage_function)`."""
    num_positional: int
    """Positional arguments of the call."""
    keywords: tuple[str, ...] = ()
    """Keyword arguments of the call."""
    var_keyword: bool = False
    """The call passes further keywords, so the hook must take **inputs."""
    contract: str = ""
    """The accepted signature, as printed in errors."""


HOOKS: dict[str, HookSpec] = {
    "reward": HookSpec("reward", 1, contract="one argument (the Sample)"),
    "generate": HookSpec("generate function (rollout.generate_function)", 3,
                         contract="async (ctx, sample, sampling) -> Sample | list[Sample]"),
    "reward_post_process": HookSpec("reward post-process hook (algo.reward_post_process)", 2, var_keyword=True,
                                    contract="(rewards, group_size, **inputs)"),
    "advantage": HookSpec("advantage hook (algo.custom_advantage_function)", 2, var_keyword=True,
                          contract="(rewards, group_size, **inputs)"),
    "dynamic_filter": HookSpec("dynamic filter hook (algo.dynamic_filter)", 2, var_keyword=True,
                               contract="(rewards, group_size, **inputs)"),
    "loss": HookSpec("loss hook (algo.custom_loss_function)", 1,
                     ("log_probs", "old_log_probs", "advantages", "loss_mask"),
                     contract="(cfg, *, log_probs, old_log_probs, advantages, loss_mask)"),
    "tis": HookSpec("TIS hook (algo.custom_tis_function)", 1, ("old_log_probs", "rollout_log_probs", "loss_mask"),
                    contract="(cfg, *, old_log_probs, rollout_log_probs, loss_mask)"),
}


def resolve_hook(path: str, kind: str, registry: dict[str, Any] | None = None) -> Callable[..., Any]:
    """A dotted path (or, given a `registry`, one of its names) -> the callable, contract-checked."""
    spec = HOOKS[kind]
    if registry is not None and path in registry:
        return registry[path]
    if ":" not in path and "." not in path:
        if registry is not None:
            raise MilesError(f"{one_of(spec.name, path, registry)}, or a 'package.module:function' path")
        raise MilesError(f"{spec.name} '{path}' must be a 'package.module:function' path")
    fn = import_callable(path, spec.name)
    _check_signature(path, fn, spec)
    return fn


def hook_error(kind: str, path: str, problem: str) -> MilesError:
    """Error for a hook that loaded but misbehaved when called (wrong output type or shape)."""
    return MilesError(f"{HOOKS[kind].name} '{path}' {problem}")


@dataclass(frozen=True)
class AlgoHooks:
    """The algo hooks of a config, resolved; None where a key is empty."""

    reward_post_process: Callable[..., Any] | None = None
    advantage: Callable[..., Any] | None = None
    dynamic_filter: Callable[..., Any] | None = None
    loss: Callable[..., Any] | None = None
    tis: Callable[..., Any] | None = None


HOOK_KEYS = {
    "reward_post_process": "reward_post_process",
    "advantage": "custom_advantage_function",
    "dynamic_filter": "dynamic_filter",
    "loss": "custom_loss_function",
    "tis": "custom_tis_function",
}


def resolve_hooks(cfg: AlgoConfig) -> AlgoHooks:
    """Resolve every hook an `AlgoConfig` names, so a bad path fails at start-up, not mid-run."""
    resolved = {}
    for f in fields(AlgoHooks):
        path = getattr(cfg, HOOK_KEYS[f.name])
        resolved[f.name] = resolve_hook(path, f.name) if path else None
    return AlgoHooks(**resolved)


def import_callable(path: str, name: str) -> Any:
    """The callable at `package.module:attr` (or `package.module.attr`); `name` says what it is in errors."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise MilesError(f"{name} path '{path}' must look like 'package.module:function' or 'package.module.function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure while importing user code is a bad input
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        raise MilesError(f"{name} '{path}': cannot import module '{module_name}' ({detail})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise MilesError(f"{name} '{path}': '{module_name}' has no attribute '{attr}'{did_you_mean(part, names)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise MilesError(f"{name} '{path}' is not callable (it is {type(obj).__name__} {obj!r:.40})")
    return obj


def _check_signature(path: str, fn: Any, spec: HookSpec) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # some builtins have no introspectable signature; the call itself will tell
    takes_var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    try:
        signature.bind(*[None] * spec.num_positional, **dict.fromkeys(spec.keywords))
        ok = takes_var_keyword or not spec.var_keyword
    except TypeError:
        ok = False
    if not ok:
        raise MilesError(f"{spec.name} '{path}' must take {spec.contract}, but its signature is {signature}")
