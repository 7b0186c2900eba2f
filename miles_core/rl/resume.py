"""A training run's full checkpoints, and resuming from one (the folder layout and the `latest`
tracker are in `checkpoint/training.py`).

A checkpoint restores everything the next step reads, so a resumed run computes what an
uninterrupted one would (bitwise on CPU): the trainer (weights, AdamW moments, LR schedule,
reference and critic models, the count of bad steps in a row), the prompt stream (remaining order
of the epoch, shuffle RNG, epoch, next request seed; sample streams are seeded from request
seeds), the partial-rollout buffer (aborted groups with their tokens, log-probs and versions),
the global RNG states, and the next rollout id, which is also the metric step and gives the
weight version the engine gets the restored weights under (`versions.version_after`). Dynamic
sampling carries no groups from one step to the next. In async mode the rollout state is the one
after the last trained step: the prompts generated ahead of it are drawn again after a restart
(`async_loop.py`), so none is lost or trained twice.

`metrics.jsonl` is cut back to the records before the checkpoint's step (a line torn by the
crash is dropped) and appended from there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miles_core.checkpoint.hf import write_hf_files
from miles_core.checkpoint.training import (
    CONFIG_NAME,
    TRAINER_DIR,
    config_changes,
    find_checkpoint,
    prune,
    read_state,
    rng_state,
    set_rng_state,
    step_dir,
    write_state,
    writing_checkpoint,
)
from miles_core.config import MilesConfig
from miles_core.config.tree import dump_toml
from miles_core.errors import MilesError
from miles_core.rl.versions import version_after
from miles_core.utils.io import atomic_write

if TYPE_CHECKING:
    from miles_core.rl.run import RunComponents

log = logging.getLogger("miles")
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Path | None
    """The full checkpoint to load; None to start over at step 0 (none was complete yet)."""
    next_step: int
    state: dict[str, Any]
    metrics_from: Path
    """The metrics.jsonl whose records before `next_step` the resumed run keeps."""


def save_run_checkpoint(parts: RunComponents, step: int) -> Path:
    """The full checkpoint after rollout step `step` (`step_{step+1}`), then `keep_last` pruning.
    A failed write (disk full) leaves the previous checkpoint as `latest` and says so."""
    path = step_dir(parts.output_dir, step + 1)
    version = version_after(step, parts.cfg.train.num_steps_per_rollout)
    state = {"format": 1, "next_step": step + 1, "metric_step": step + 1, "weight_version": version,
             "rollouts": parts.rollouts.state_dict(), "rng": rng_state()}
    try:
        with writing_checkpoint(path) as tmp:
            write_hf_files(tmp, parts.trainer.export_weights(), parts.loaded.hf_config, source_dir=parts.loaded.path)
            parts.trainer.save(tmp / TRAINER_DIR)
            (tmp / CONFIG_NAME).write_text(dump_toml(parts.cfg), encoding="utf-8")
            write_state(tmp, state)
    except OSError as err:
        latest = find_checkpoint(parts.output_dir)
        kept = f"'{latest}' is still the latest checkpoint" if latest else "no earlier checkpoint exists"
        raise MilesError(f"could not write checkpoint '{path}' ({err.strerror or err}); {kept}. Free space and "
                         "resume with --resume auto") from err
    for old in prune(path.parent, parts.cfg.loop.keep_last):
        log.info("removed checkpoint '%s' (loop.keep_last = %d)", old, parts.cfg.loop.keep_last)
    return path


def find_resume_point(resume: str | Path, cfg: MilesConfig, output_dir: Path, *, required: bool) -> ResumePoint:
    """Where a resumed run starts: `resume` is "auto" (`output_dir`'s latest checkpoint) or a
    checkpoint, checkpoints or run folder. Without a checkpoint there, an error when `required`,
    else a fresh start. Refused when the config changed in a key that matters."""
    source = output_dir if str(resume) == "auto" else Path(resume)
    checkpoint = find_checkpoint(source) if source.exists() else None
    if checkpoint is None:
        if required and str(resume) != "auto":
            raise MilesError(f"no full checkpoint in '{source}' (expected a run folder with checkpoints/latest, or "
                             "a checkpoints/step_NNNNNN folder holding state.json)")
        log.info("no complete checkpoint in '%s' yet: starting at step 0", source)
        return ResumePoint(None, 0, {}, output_dir / METRICS)
    run_dir = checkpoint.parent.parent
    _check_target(run_dir, output_dir)
    _check_config(checkpoint, cfg)
    state = read_state(checkpoint)
    if state["next_step"] > cfg.loop.num_rollout:
        raise MilesError(f"checkpoint '{checkpoint}' is after step {state['next_step']}, past loop.num_rollout = "
                         f"{cfg.loop.num_rollout}; raise --num-rollout to go on")
    return ResumePoint(checkpoint, state["next_step"], state, run_dir / METRICS)


def _check_target(run_dir: Path, output_dir: Path) -> None:
    """A checkpoint continues its own run, or starts a new folder; never another run's."""
    metrics = output_dir / METRICS
    same = output_dir.exists() and run_dir.resolve() == output_dir.resolve()
    if not same and metrics.is_file() and metrics.stat().st_size > 0:
        raise MilesError(f"output dir '{output_dir}' holds another run; resume a checkpoint of '{run_dir}' into "
                         "that folder or an empty one")


def _check_config(checkpoint: Path, cfg: MilesConfig) -> None:
    saved = (checkpoint / CONFIG_NAME).read_text(encoding="utf-8")
    changes = config_changes(saved, dump_toml(cfg), num_rollout_matters=cfg.train.lr_schedule == "cosine")
    if changes:
        raise MilesError(f"cannot resume from '{checkpoint}': the config changed where it matters ("
                         + "; ".join(changes) + "); only run length, save/eval intervals, output paths, reward "
                         "timeouts and train.max_bad_steps may change (and run length not with a cosine LR)")


def restore_run(parts: RunComponents, point: ResumePoint) -> int:
    """Load the checkpoint into the built run, hand the weights to the engine, cut the metrics
    back; returns the first step to run."""
    if point.checkpoint is not None:
        parts.trainer.load(point.checkpoint / TRAINER_DIR)
        parts.rollouts.load_state_dict(point.state["rollouts"])
        if parts.sync is not None:
            parts.sync.push(parts.trainer.export_weights(), version=point.state["weight_version"])
        set_rng_state(point.state["rng"])  # last: building and syncing must not move it
    truncate_metrics(point.metrics_from, parts.output_dir / METRICS, point.next_step)
    return point.next_step


def truncate_metrics(source: Path, target: Path, next_step: int) -> int:
    """Write `target` with `source`'s records of steps before `next_step`; a torn last line is
    dropped. Returns how many records were kept."""
    kept = []
    if source.is_file():
        for line in source.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                log.info("dropped a torn line of '%s' (the run was killed while writing it)", source)
                continue
            if isinstance(record, dict) and record.get("step", next_step) < next_step:
                kept.append(line + "\n")
    if kept or target.exists():
        with atomic_write(target, durable=True) as handle:
            handle.writelines(kept)
    return len(kept)
