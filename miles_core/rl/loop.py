"""The GRPO loop: generate -> reward -> advantages -> train -> sync weights -> log -> save.

It only wires components together; the math lives in `algo/`, the rollout side (prompts,
generation, rewards, dynamic sampling) in the rollout manager (`manager.py`), the trainer's
inputs (reward shaping, advantages) in `train_batch.py`, and weight transport in `sync/`. Debug
modes mirror slime: `rollout_only` never trains (and saves each step's samples), `train_only`
trains on samples saved by an earlier run instead of generating.

Evaluation (`eval/*` metrics) is stamped with the number of updates behind the weights: the eval
at step s scores the weights that generate rollout s, and is logged in step s's record; the eval
after the last step gets a record of its own, step `num_rollout` (the final checkpoint's number).

Async mode (`loop.mode = "async"`, `async_loop.py`) changes where rollouts come from and where
weights go, not this loop: the rollout source generates later steps in the background, the sync
hands weights to it, and evals run there on the weights they name. Weight versions count
optimizer steps (`versions.py`); they are pushed after every step, trained or not.

Checkpoints are full (resumable, `resume.py`). `resume` continues from one; `should_stop` is
polled between steps (a signal handler sets it): the run saves what it finished and raises
`RunStopped`, never stopping inside a step. A skipped optimizer step (non-finite loss or gradient
norm) is logged with the offending samples; non-finite weights still stop the run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from miles_core.algo import resolve_hooks, should_update_reference
from miles_core.algo.mismatch import check_true_on_policy
from miles_core.config import MilesConfig
from miles_core.errors import RunStopped
from miles_core.metrics import MetricsWriter, memory_metrics, perf_metrics, reset_peak_memory
from miles_core.rl.resume import find_resume_point, restore_run, save_run_checkpoint
from miles_core.rl.run import RunComponents
from miles_core.rl.train_batch import prepare_train_batch
from miles_core.rl.versions import version_after
from miles_core.train.finite import check_finite_weights

Mode = Literal["full", "rollout_only", "train_only"]
StepCallback = Callable[[int, dict[str, float]], None]
log = logging.getLogger("miles")


@dataclass
class RunResult:
    output_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    """(step, eval metrics) of every evaluation; step = updates behind the evaluated weights."""
    checkpoints: list[Path] = field(default_factory=list)
    start_step: int = 0
    """The first step this process ran (> 0 when resumed)."""


def run_training(cfg: MilesConfig, output_dir: Path, *, mode: Mode = "full", rollout_data: str | None = None,
                 on_step: StepCallback | None = None, resume: str | Path | None = None, resume_required: bool = True,
                 should_stop: Callable[[], bool] = lambda: False) -> RunResult:
    """`miles train`: `cfg.loop.num_rollout` GRPO steps; metrics, samples and checkpoints in
    `output_dir`. `resume`: "auto" or a checkpoint path (`resume_required`: error when it holds
    none, else start at step 0)."""
    resolve_hooks(cfg.algo)  # a bad hook path fails now, before any model is loaded
    point = find_resume_point(resume, cfg, output_dir, required=resume_required) if resume is not None else None
    parts = RunComponents.create(cfg, output_dir, mode=mode, rollout_data=rollout_data, resuming=point is not None)
    try:
        start = restore_run(parts, point) if point is not None else 0
        writer = MetricsWriter(output_dir / "metrics.jsonl")
    except BaseException:
        parts.close()  # launched engine servers too
        raise
    result = RunResult(output_dir, start_step=start)
    parts.start(start)
    try:
        for step in range(start, cfg.loop.num_rollout):
            if should_stop():
                _stop(parts, result, step)
            metrics = _evaluate(parts, step, result)
            metrics.update(_rollout_step(cfg, parts, step))
            writer.write(step, metrics)
            result.history.append(metrics)
            if on_step:
                on_step(step, metrics)
            if parts.trainer and _should_save(cfg, step):
                result.checkpoints.append(save_run_checkpoint(parts, step))
        if final := _evaluate(parts, cfg.loop.num_rollout, result):
            writer.write(cfg.loop.num_rollout, final)
    finally:
        parts.close()
        writer.close()
    return result


def _stop(parts: RunComponents, result: RunResult, step: int) -> None:
    """Save the steps finished since the last checkpoint, then raise `RunStopped`."""
    done = step > result.start_step and parts.trainer is not None
    if done and not (result.checkpoints and result.checkpoints[-1].name == f"step_{step:06d}"):
        result.checkpoints.append(save_run_checkpoint(parts, step - 1))
    raise RunStopped(step, result.checkpoints[-1] if result.checkpoints else None)


def _evaluate(parts: RunComponents, step: int, result: RunResult) -> dict[str, float]:
    """Held-out metrics of the weights after `step` updates, when that step is due for them."""
    if not parts.should_eval(step):
        return {}
    metrics = parts.evaluate(step)
    result.evals.append((step, metrics))
    return dict(metrics)


def _rollout_step(cfg: MilesConfig, parts: RunComponents, step: int) -> dict[str, float]:
    times: dict[str, float] = {}
    reset_peak_memory()
    start = time.perf_counter()
    rollout = parts.rollouts.collect(step)  # generate (dynamic-sampling rounds) and reward
    times["rollout_time" if parts.engine is not None else "load_rollout_time"] = time.perf_counter() - start
    parts.save_rollout_data(step, rollout.samples)

    metrics = dict(rollout.metrics)
    if parts.trainer is not None and rollout.samples:
        start = time.perf_counter()
        metrics.update(parts.colocation.before_train())  # engine.colocate: the engine gives the GPU up
        colocate_time = time.perf_counter() - start
        start = time.perf_counter()
        batch, batch_metrics = prepare_train_batch(cfg, parts.trainer, rollout.samples)  # shape rewards, advantages
        metrics.update(batch_metrics)
        metrics.update({f"train/{k}": v for k, v in parts.trainer.train_rollout(batch).items()})
        for note in parts.trainer.skipped_notes():
            log.warning("step %d: optimizer step skipped, non-finite %s", step, note)
        times["train_time"] = time.perf_counter() - start
        start = time.perf_counter()
        metrics.update(parts.colocation.after_train())  # ... and takes it back before the sync
        if parts.colocation.enabled:  # memory moves and graph captures are part of the step's time
            times["colocate_time"] = colocate_time + time.perf_counter() - start
        check_true_on_policy(cfg.alignment, metrics, step)
        check_finite_weights(parts.trainer.export_weights(), step)  # never sync or save NaN/Inf
    if parts.sync is not None:
        version = version_after(step, cfg.train.num_steps_per_rollout)
        times["sync_time"] = parts.sync.push(parts.trainer.export_weights(), version=version).seconds
    if parts.trainer is not None and should_update_reference(step, cfg.algo.ref_update_interval):
        parts.trainer.update_reference()
    metrics.update(perf_metrics(times, generated=rollout.generated, trained=rollout.samples))
    metrics.update(memory_metrics())
    parts.colocation.whole_step_peak(metrics)
    return metrics


def _should_save(cfg: MilesConfig, step: int) -> bool:
    last = step == cfg.loop.num_rollout - 1
    return last or (cfg.loop.save_interval > 0 and (step + 1) % cfg.loop.save_interval == 0)
