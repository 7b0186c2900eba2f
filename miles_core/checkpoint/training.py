"""Full training checkpoints: the folder layout, the `latest` tracker, pruning, RNG states, and
which config keys a resume may change.

A run folder's `checkpoints/step_NNNNNN/` holds the HF export at its top (loads in
`transformers` as before) and, beside it, what resuming needs:

    trainer/       the trainer's own state (`TrainBackend.save`: weights, optimizer, LR
                   scheduler, reference and critic models)
    state.json     the loop's state: next rollout id, metric step, weight version, RNG states,
                   the prompt stream's order / position / epoch / next request seed
    config.toml    the resolved config the state belongs to

The folder is built under a temp name, fsynced and renamed; `checkpoints/latest` (the folder's
name) is written, fsynced, last. A crash at any point leaves the previous checkpoint as `latest`.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from miles_core.errors import MilesError
from miles_core.utils.io import atomic_dir, atomic_write

LATEST = "latest"
STATE_NAME = "state.json"
TRAINER_DIR = "trainer"
CONFIG_NAME = "config.toml"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Keys a resume may change: how long the run goes on, how often it saves and evaluates, where
# it writes, and how patient it is with rewards and bad steps. Every other key (model, data,
# sampling, rollout, algo, optimizer, engine, alignment) changes what the next step computes.
RESUMABLE_CHANGES = ("description", "loop.num_rollout", "loop.save_interval", "loop.keep_last", "loop.output_dir",
                     "loop.save_rollout_data",
                     "loop.save_rollout_data_path", "eval.", "reward.timeout", "reward.max_concurrency",
                     "reward.max_failure_fraction", "train.max_bad_steps")


def step_dir(run_dir: Path, step: int) -> Path:
    """The checkpoint folder after `step` rollout steps."""
    return run_dir / "checkpoints" / f"step_{step:06d}"


@contextlib.contextmanager
def writing_checkpoint(path: Path) -> Iterator[Path]:
    """A temp folder that becomes `path` (fsynced) if the block succeeds; then the tracker."""
    with atomic_dir(path, durable=True) as tmp:
        yield tmp
    with atomic_write(path.parent / LATEST, durable=True) as handle:
        handle.write(path.name + "\n")


def is_complete(folder: Path) -> bool:
    return (folder / STATE_NAME).is_file() and (folder / TRAINER_DIR).is_dir()


def find_checkpoint(path: Path) -> Path | None:
    """The full checkpoint `path` names: a `step_NNNNNN` folder, a `checkpoints` folder or a run
    folder (their `latest`). None when there is none yet; an error when the tracker is broken."""
    if is_complete(path):
        return path
    for folder in (path, path / "checkpoints"):
        tracker = folder / LATEST
        if tracker.is_file():
            target = folder / tracker.read_text(encoding="utf-8").strip()
            if not is_complete(target):
                raise MilesError(f"'{tracker}' names '{target.name}', which is not a complete checkpoint "
                                 f"(expected {STATE_NAME} and {TRAINER_DIR}/ in it)")
            return target
    return None


def prune(checkpoints: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest `keep_last` step folders (never the one `latest` names)."""
    if keep_last < 1:
        return []
    latest = (checkpoints / LATEST).read_text(encoding="utf-8").strip()
    steps = sorted((int(m[1]), p) for p in checkpoints.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    removed = [p for _, p in steps[:-keep_last] if p.name != latest]
    for path in removed:
        shutil.rmtree(path)
    return removed


def rng_state() -> dict[str, Any]:
    """Every global random state, as JSON lists (torch's byte tensors become int lists)."""
    state: dict[str, Any] = {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    with contextlib.suppress(ImportError):
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), pos, has_gauss, gauss]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def write_state(folder: Path, state: dict[str, Any]) -> None:
    (folder / STATE_NAME).write_text(json.dumps(state) + "\n", encoding="utf-8")


def read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MilesError(f"cannot read '{folder / STATE_NAME}' ({err}); resume from an earlier checkpoint") from None


def config_changes(saved_toml: str, current_toml: str, *, num_rollout_matters: bool) -> list[str]:
    """`key: old -> new` for every resolved-config key that differs and may not change on resume."""
    saved, current = _flatten(tomllib.loads(saved_toml)), _flatten(tomllib.loads(current_toml))
    allowed = [k for k in RESUMABLE_CHANGES if not (num_rollout_matters and k == "loop.num_rollout")]
    changed = []
    for key in sorted(saved.keys() | current.keys()):
        may_change = any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)
        if saved.get(key) != current.get(key) and not may_change:
            changed.append(f"{key}: {_show(saved.get(key))} -> {_show(current.get(key))}")
    return changed


def _show(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
