"""Run metrics: per-step JSONL records with slime's names, and summaries of a rollout.

Names: `rollout/*` (what the engine produced and how it was rewarded, over every sample generated
in the step; then what entered the update: `shaped_reward`, `advantages`, `returns`, `values`,
`ref_kl`, and DAPO's `dynamic_sampling_*`), `train/*` (losses, clip fractions, KL, entropy, TIS,
value loss, grad norms, train/rollout log-prob gap), `perf/*` (times, tok/s).
One JSON object per rollout step goes to `metrics.jsonl`; the file is flushed after every line
so a crashed run keeps every finished step.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from miles_core.sample import Sample, Status


class MetricsWriter:
    """Append-only JSONL sink, one record per step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = None  # opened on the first record: a run that fails earlier leaves no file

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a", encoding="utf-8")
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def mean(values: Sequence[float]) -> float:
    """Mean of `values`; 0 for none."""
    return sum(values) / len(values) if values else 0.0


def rollout_metrics(samples: Sequence[Sample], rewards: Sequence[float], group_size: int) -> dict[str, float]:
    """`rollout/*` metrics of one rollout step."""
    lengths = [s.response_length for s in samples]
    groups = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    flat_groups = sum(1 for g in groups if max(g) - min(g) < 1e-8)
    return {
        "rollout/raw_reward": mean(rewards),
        "rollout/response_len": mean(lengths),
        "rollout/response_len_max": float(max(lengths, default=0)),
        "rollout/truncated": mean([float(s.status == Status.TRUNCATED) for s in samples]),
        "rollout/zero_std_groups": flat_groups / max(len(groups), 1),
        "rollout/num_samples": float(len(samples)),
    }


def token_means(loss_mask, **per_token) -> dict[str, float]:
    """`rollout/<name>`: the mean of each (N, T) tensor over the trained tokens (mask > 0)."""
    mask = loss_mask > 0
    count = max(int(mask.sum()), 1)
    return {f"rollout/{name}": float(values[mask].sum()) / count for name, values in per_token.items()}


def reset_peak_memory() -> None:
    """Start a new peak for `memory_metrics` (call at the start of a step)."""
    torch = sys.modules.get("torch")  # no import: a run without torch loaded has no GPU memory
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def memory_metrics() -> dict[str, float]:
    """`perf/peak_gpu_memory_gb`: the most GPU memory allocated by tensors since the last
    `reset_peak_memory` (absent without CUDA); `perf/peak_cpu_rss_gb`: the process's peak resident
    memory so far (the OS keeps one peak per process, so it never goes down between steps)."""
    out = {}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["perf/peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource  # Unix only
    except ImportError:
        return out
    out["perf/peak_cpu_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return out


def perf_metrics(times: dict[str, float], *, generated: Sequence[Sample],
                 trained: Sequence[Sample]) -> dict[str, float]:
    """`perf/*`: the step's timed phases (seconds), their sum, and generated / trained tokens per second."""
    out = {f"perf/{k}": v for k, v in times.items()}
    out["perf/step_time"] = sum(times.values())
    if "rollout_time" in times:
        out["perf/rollout_tokens_per_s"] = sum(s.response_length for s in generated) / max(times["rollout_time"], 1e-9)
    if "train_time" in times:
        out["perf/train_tokens_per_s"] = sum(len(s.tokens) for s in trained) / max(times["train_time"], 1e-9)
    return out
