"""The GRPO loop: generate -> reward -> advantages -> train -> sync weights -> log -> save.

It only wires components together; the math lives in `algo/`, generation in `engine/`,
training in `train/`. Debug modes mirror slime: `rollout_only` never trains (and saves each
step's samples), `train_only` trains on samples saved by an earlier run instead of generating.

Evaluation (`eval/*` metrics) is stamped with the number of updates behind the weights: the eval
at step s scores the weights that generate rollout s, and is logged in step s's record; the eval
after the last step gets a record of its own, step `num_rollout` (the final checkpoint's number).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from miles_core.config import MilesConfig
from miles_core.metrics import MetricsWriter, rollout_metrics
from miles_core.mismatch import check_true_on_policy
from miles_core.sample import Sample

Mode = Literal["full", "rollout_only", "train_only"]
StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class RunResult:
    output_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    """(step, eval metrics) of every evaluation; step = updates behind the evaluated weights."""
    checkpoints: list[Path] = field(default_factory=list)


def run_training(cfg: MilesConfig, output_dir: Path, *, mode: Mode = "full", rollout_data: str | None = None,
                 on_step: StepCallback | None = None) -> RunResult:
    """`miles train`: `cfg.loop.num_rollout` GRPO steps; metrics, samples and checkpoints in `output_dir`."""
    from miles_core.components import RunComponents

    parts = RunComponents.create(cfg, output_dir, mode=mode, rollout_data=rollout_data)
    result = RunResult(output_dir)
    writer = MetricsWriter(output_dir / "metrics.jsonl")
    try:
        for step in range(cfg.loop.num_rollout):
            metrics = _evaluate(parts, step, result)
            metrics.update(_rollout_step(cfg, parts, step))
            writer.write(step, metrics)
            result.history.append(metrics)
            if on_step:
                on_step(step, metrics)
            if parts.trainer and _should_save(cfg, step):
                result.checkpoints.append(parts.save_checkpoint(step))
        if final := _evaluate(parts, cfg.loop.num_rollout, result):
            writer.write(cfg.loop.num_rollout, final)
    finally:
        writer.close()
    return result


def _evaluate(parts, step: int, result: RunResult) -> dict[str, float]:
    """Held-out metrics of the weights after `step` updates, when that step is due for them."""
    if not parts.should_eval(step):
        return {}
    metrics = parts.evaluate()
    result.evals.append((step, metrics))
    return dict(metrics)


def _rollout_step(cfg: MilesConfig, parts, step: int) -> dict[str, float]:
    from miles_core.algo import broadcast_to_tokens, compute_advantages
    from miles_core.rewards import compute_rewards, scalar_reward
    from miles_core.train.batch import TrainBatch, pad_ragged

    times: dict[str, float] = {}
    start = time.perf_counter()
    samples = parts.rollout(step)
    times["rollout_time" if parts.engine is not None else "load_rollout_time"] = time.perf_counter() - start

    reward_stats = compute_rewards([s for s in samples if s.reward is None], cfg.reward)
    rewards = [scalar_reward(s, cfg.reward) for s in samples]
    group = cfg.sampling.n_samples_per_prompt
    masks = [torch.tensor(s.loss_mask or [1] * s.response_length, dtype=torch.float32) for s in samples]
    per_sample = compute_advantages(cfg.algo.advantage_estimator, torch.tensor(rewards), group)
    advantages = broadcast_to_tokens(per_sample, pad_ragged(masks))
    parts.save_rollout_data(step, samples)

    metrics = rollout_metrics(samples, rewards, group)
    metrics["rollout/reward_failures"] = float(reward_stats.num_failed)
    if parts.trainer is not None:
        start = time.perf_counter()
        batch = TrainBatch.from_samples(samples, [advantages[i, : len(m)] for i, m in enumerate(masks)])
        metrics.update({f"train/{k}": v for k, v in parts.trainer.train_rollout(batch).items()})
        times["train_time"] = time.perf_counter() - start
        check_true_on_policy(cfg.alignment, metrics, step)
        if parts.engine is not None:
            start = time.perf_counter()
            parts.engine.update_weights(parts.trainer.export_weights(), version=str(step + 1))
            times["sync_time"] = time.perf_counter() - start
    metrics.update(_perf_metrics(samples, times))
    return metrics


def _perf_metrics(samples: list[Sample], times: dict[str, float]) -> dict[str, float]:
    out = {f"perf/{k}": v for k, v in times.items()}
    out["perf/step_time"] = sum(times.values())
    if "rollout_time" in times:
        response_tokens = sum(s.response_length for s in samples)
        out["perf/rollout_tokens_per_s"] = response_tokens / max(times["rollout_time"], 1e-9)
    if "train_time" in times:
        out["perf/train_tokens_per_s"] = sum(len(s.tokens) for s in samples) / max(times["train_time"], 1e-9)
    return out


def _should_save(cfg: MilesConfig, step: int) -> bool:
    last = step == cfg.loop.num_rollout - 1
    return last or (cfg.loop.save_interval > 0 and (step + 1) % cfg.loop.save_interval == 0)
