"""Evaluation on held-out prompt sets: the pass@k / mean@k estimators and the eval runner.

Per dataset `<name>` (`[[eval.datasets]]`), every prompt gets n = `n_samples_per_prompt`
responses, scored with the dataset's reward. A sample is *correct* when its reward is
>= `correct_threshold` (1.0 by default: the built-in rewards give 1 for a right answer).

    eval/<name>/reward        mean reward over all samples
    eval/<name>/accuracy      fraction of correct samples
    eval/<name>/pass@k        chance that at least one of k samples of a prompt is correct, mean over
                              prompts; k = 1, 2, 4, ... below n, and n (pass@1 == accuracy)
    eval/<name>/mean@n        expected mean reward of n samples of a prompt, mean over prompts
    eval/<name>/response_len  mean response length in tokens
    eval/<name>/truncated     fraction of responses cut by `max_new_tokens` (or the context)
    eval/<name>/reward_failures  samples whose reward function failed (scored 0)

pass@k uses the unbiased estimator of Chen et al. 2021 (Codex, eq. 1): from n samples of which
c are correct, pass@k = 1 - C(n-c, k) / C(n, k), the chance that k samples drawn without
replacement are not all wrong. It has lower variance than drawing k samples once.
mean@k (verl's name) is the expected mean reward of k samples; its unbiased estimate from
n >= k samples is the mean of all n whatever k is, so it is logged once, as `mean@n`.

Request seeds are `sampling.seed + prompt index`, the same at every evaluation: two
evaluations (two steps of a run, or two checkpoints) differ only by the weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from miles_core.checkpoint.loading import load_model
from miles_core.config import EvalConfig, EvalDatasetConfig, MilesConfig, RolloutConfig
from miles_core.data import load_prompts
from miles_core.engine import build_engine, close_engine
from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import MilesError
from miles_core.metrics import mean
from miles_core.rewards import scalar_reward
from miles_core.rl.manager import RolloutManager
from miles_core.sample import Sample, Status

Progress = Callable[[int], None]


# -- estimators ----------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples with `c` correct: 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_at_k(rewards: Sequence[float], k: int) -> float:
    """Unbiased mean@k, the expected mean reward of k of these samples: the mean of all of them
    (each sample is in the same share of k-subsets), so `k` only has to be in [1, n]."""
    if not 1 <= k <= len(rewards):
        raise ValueError(f"mean@k needs 1 <= k <= n, got n={len(rewards)}, k={k}")
    return sum(rewards) / len(rewards)


def k_values(n: int) -> list[int]:
    """The k reported for n samples per prompt: powers of two below n, and n."""
    return [2**i for i in range(n.bit_length()) if 2**i < n] + [n]


def group_metrics(rewards: Sequence[Sequence[float]], correct_threshold: float) -> dict[str, float]:
    """`reward`, `accuracy`, `pass@k`, `mean@n` of prompts that each have the same n rewards."""
    sizes = {len(group) for group in rewards}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"every prompt needs the same non-zero number of samples, got sizes {sorted(sizes)}")
    n = sizes.pop()
    correct = [sum(r >= correct_threshold for r in group) for group in rewards]
    flat = [r for group in rewards for r in group]
    out = {"reward": mean(flat), "accuracy": sum(correct) / len(flat)}
    for k in k_values(n):
        out[f"pass@{k}"] = mean([pass_at_k(n, c, k) for c in correct])
    out[f"mean@{n}"] = mean([mean_at_k(group, n) for group in rewards])
    return out


# -- runner ----------------------------------------------------------------------------------------

@dataclass
class EvalSet:
    """One eval dataset with its prompts loaded (rendered per evaluation, by that model's tokenizer)."""

    cfg: EvalDatasetConfig
    prompts: list[Sample]

    @property
    def num_samples(self) -> int:
        return len(self.prompts) * self.cfg.sampling.n_samples_per_prompt


def load_eval_sets(cfg: EvalConfig) -> list[EvalSet]:
    """The prompts of every eval dataset; bad files fail here, before any model is loaded."""
    sets = []
    for dataset in cfg.datasets:
        try:
            sets.append(EvalSet(dataset, load_prompts(dataset.data)))
        except MilesError as err:
            raise MilesError(f"eval dataset '{dataset.name}': {err}") from None
    return sets


def fit_eval_sets(eval_sets: Sequence[EvalSet], engine: RolloutEngine, tokenizer,
                  rollout: RolloutConfig | None = None) -> list[EvalSet]:
    """Every eval set without its prompts that leave no room in the engine's context (or an error
    naming the first one; see `data.lengths.fit_prompts`), checked before the first step."""
    out = []
    for eval_set in eval_sets:
        ds = eval_set.cfg
        manager = RolloutManager(engine, tokenizer, data=ds.data, sampling=ds.sampling, reward=ds.reward,
                                 rollout=rollout)
        try:
            out.append(EvalSet(ds, manager.fit(eval_set.prompts)[0]))
        except MilesError as err:
            raise MilesError(f"eval dataset '{ds.name}': {err}") from None
    return out


def evaluate(engine: RolloutEngine, tokenizer, eval_sets: Sequence[EvalSet], *,
             on_progress: Progress | None = None, rollout: RolloutConfig | None = None) -> dict[str, float]:
    """`eval/<name>/*` metrics of the engine's current weights, and `perf/eval_time` (seconds)."""
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    for eval_set in eval_sets:
        metrics.update(evaluate_dataset(engine, tokenizer, eval_set, on_progress=on_progress, rollout=rollout)[0])
    metrics["perf/eval_time"] = time.perf_counter() - start
    return metrics


def evaluate_dataset(engine: RolloutEngine, tokenizer, eval_set: EvalSet, *, on_progress: Progress | None = None,
                     rollout: RolloutConfig | None = None) -> tuple[dict[str, float], list[list[Sample]]]:
    """(`eval/<name>/*` metrics, the scored samples grouped by prompt) of one dataset; `rollout`:
    the run's multi-turn settings (tools, generate function), so eval samples are made like training's."""
    ds = eval_set.cfg
    manager = RolloutManager(engine, tokenizer, data=ds.data, sampling=ds.sampling, reward=ds.reward, rollout=rollout)
    groups = manager.generate_all(eval_set.prompts, on_progress=on_progress)
    samples = [s for group in groups for s in group]
    num_failed = manager.score(samples)
    metrics = group_metrics([[scalar_reward(s, ds.reward) for s in g] for g in groups], ds.correct_threshold)
    metrics["response_len"] = mean([s.response_length for s in samples])
    metrics["truncated"] = mean([float(s.status == Status.TRUNCATED) for s in samples])
    metrics["reward_failures"] = float(num_failed)
    return {f"eval/{ds.name}/{k}": v for k, v in metrics.items()}, groups


# -- offline evaluation of checkpoints ---------------------------------------------------------------

@dataclass
class EvalReport:
    """What `miles rollout --eval` reports: one metrics dict per checkpoint, in the given order."""

    checkpoints: list[str]
    datasets: list[str]
    metrics: list[dict[str, float]] = field(default_factory=list)
    """`eval/<name>/*` of each checkpoint (no timings, so equal runs compare equal)."""
    seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"datasets": self.datasets,
                "checkpoints": [{"checkpoint": c, "seconds": s, "metrics": m}
                                for c, m, s in zip(self.checkpoints, self.metrics, self.seconds)]}


def run_eval(cfg: MilesConfig, checkpoints: Sequence[str] = (), *, on_start: Callable[[int], None] | None = None,
             on_progress: Progress | None = None) -> EvalReport:
    """Evaluate each checkpoint (a `model.source`; none = the recipe's model) on the recipe's eval
    datasets, one after another on a fresh engine, with the same prompts and seeds."""
    if not cfg.eval.datasets:
        raise MilesError("the recipe has no eval datasets; add one under eval.datasets (see README.md, section "
                         "Evaluation > Eval datasets in a recipe)")
    checkpoints = list(checkpoints) or [cfg.model.source]
    eval_sets = load_eval_sets(cfg.eval)
    report = EvalReport(checkpoints, [s.cfg.name for s in eval_sets])
    if on_start:
        on_start(len(checkpoints) * sum(s.num_samples for s in eval_sets))
    for checkpoint in checkpoints:
        loaded = load_model(replace(cfg.model, source=checkpoint), alignment_mode=cfg.alignment.mode)
        engine = build_engine(cfg.engine, loaded)
        try:
            fitted = fit_eval_sets(eval_sets, engine, loaded.tokenizer, cfg.rollout)  # before any generation
            metrics = evaluate(engine, loaded.tokenizer, fitted, on_progress=on_progress, rollout=cfg.rollout)
        finally:
            close_engine(engine)  # launched servers stop before the next checkpoint's start
        report.seconds.append(metrics.pop("perf/eval_time"))
        report.metrics.append(metrics)
        del loaded  # one model in memory at a time
    return report
