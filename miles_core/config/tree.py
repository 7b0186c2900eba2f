"""Generic machinery that turns TOML recipes into a tree of frozen dataclasses.

A recipe is a TOML file whose tables mirror the config tree (`[sampling]` -> `SamplingConfig`).
`extends = "other"` at the top level deep-merges this file over another recipe. Overrides
`section.key=value` are parsed as TOML literals (a bare word falls back to a string) and type
checked against the dataclass field they target. Unknown keys are rejected with a did-you-mean.
This module knows nothing about miles' sections; `config.py` declares them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import tomli_w

from miles_core.errors import MilesError, did_you_mean, one_of
from miles_core.utils.io import read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = typing.TypeVar("T")


def check(condition: bool, message: str) -> None:
    """Validation helper for `__post_init__`: a ValueError that `build` turns into a MilesError."""
    if not condition:
        raise ValueError(message)


def recipe_dirs() -> list[Path]:
    """Where built-in recipes live: the source checkout, then the installed package copy."""
    package = Path(__file__).resolve().parents[1]  # miles_core/
    return [p for p in (package.parent / "recipes", package / "_recipes") if p.is_dir()]


def list_recipes() -> dict[str, Path]:
    """Built-in recipe names -> files (first directory wins)."""
    found: dict[str, Path] = {}
    for directory in recipe_dirs():
        for path in sorted(directory.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def find_recipe(name_or_path: str) -> Path:
    """A recipe file from a path, or from a built-in name such as `quickstart`."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise MilesError(f"recipe file not found: '{name_or_path}'")
        return path
    recipes = list_recipes()
    if name_or_path not in recipes:
        raise one_of("recipe", name_or_path, recipes)
    return recipes[name_or_path]


def load_recipe(name_or_path: str, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe (following `extends`) into a plain nested dict."""
    path = find_recipe(name_or_path).resolve()
    if path in _seen:
        raise MilesError(f"recipe '{path}' extends itself (cycle: {' -> '.join(map(str, _seen))})")
    try:
        data = tomllib.loads(read_text(path, "recipe"))
    except tomllib.TOMLDecodeError as err:
        raise MilesError(f"recipe '{path}' is not valid TOML: {err}") from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return deep_merge(load_recipe(_resolve_parent(path, str(parent)), _seen + (path,)), data)


def _resolve_parent(recipe: Path, parent: str) -> str:
    """`extends` names a file next to the recipe (with or without `.toml`) or a built-in recipe."""
    for candidate in (recipe.parent / parent, recipe.parent / f"{parent}.toml"):
        if candidate.is_file():
            return str(candidate)
    return parent


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins; nested tables merge key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str], root: type) -> dict[str, Any]:
    """Apply `a.b.c=value` strings to a raw recipe dict, checking keys against `root`."""
    data = deep_merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MilesError(f"bad override '{item}'; expected section.key=value")
        field_type = _field_type_at(root, key.split("."))
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MilesError(f"override '{key}': '{part}' is not a section")
        node[leaf] = _parse_literal(raw.strip(), field_type)
    return data


def _field_type_at(root: type, parts: list[str]) -> Any:
    cls, path = root, ""
    for index, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise MilesError(f"unknown config key '{path}{part}'{did_you_mean(part, hints)}")
        kind = _strip_optional(hints[part])
        if index < len(parts) - 1:
            if not _is_dataclass_type(kind):
                raise MilesError(f"config key '{path}{part}' is a value, not a section")
            cls = kind
        path += part + "."
    return kind


def _parse_literal(raw: str, field_type: Any) -> Any:
    if field_type is str or (typing.get_origin(field_type) is Literal and all(isinstance(a, str) for a in typing.get_args(field_type))):
        if not (raw.startswith('"') or raw.startswith("'")):
            return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def build(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from `data`, type checking every value (errors name the key)."""
    if not isinstance(data, dict):
        raise MilesError(f"config section '{path.rstrip('.') or '<root>'}' must be a table, got {data!r}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise MilesError(f"unknown config key '{path}{key}'{did_you_mean(key, hints)}")
        kwargs[key] = _coerce(value, hints[key], f"{path}{key}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise MilesError(f"{path.rstrip('.') or 'config'}: {err}") from None


def _coerce(value: Any, kind: Any, key: str) -> Any:
    kind_stripped = _strip_optional(kind)
    if _is_dataclass_type(kind_stripped):
        return build(kind_stripped, value, key + ".")
    origin, args = typing.get_origin(kind_stripped), typing.get_args(kind_stripped)
    if origin is Literal:
        if value not in args:
            raise one_of(f"value for '{key}'", str(value), [str(a) for a in args])
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise MilesError(f"config key '{key}' expects a list, got {value!r}")
        if _is_dataclass_type(args[0]):  # a list of tables: errors name the entry
            return tuple(build(args[0], item, f"{key}[{i}].") for i, item in enumerate(value))
        return tuple(_coerce(item, args[0], key) for item in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise MilesError(f"config key '{key}' expects a table, got {value!r}")
        return dict(value)
    return _coerce_scalar(value, kind_stripped, key)


def _coerce_scalar(value: Any, kind: Any, key: str) -> Any:
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, float) and not math.isfinite(value):
        # No float setting of miles means anything at inf or nan (limits say "0 disables").
        raise MilesError(f"config key '{key}' must be a finite number, got {value}")
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise MilesError(f"config key '{key}' expects {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _strip_optional(kind: Any) -> Any:
    if typing.get_origin(kind) in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def _is_dataclass_type(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def to_dict(config: Any) -> dict[str, Any]:
    """Config tree -> plain dict suitable for TOML (None dropped, tuples as lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = [to_dict(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[f.name] = value
    return out


def dump_toml(config: Any) -> str:
    """The resolved config as TOML text (scalars first so tables nest correctly)."""
    return tomli_w.dumps(to_dict(config))
