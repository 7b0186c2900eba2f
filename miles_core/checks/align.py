"""`miles align-check` core: how far the trainer's log-probs are from the rollout engine's.

The engine generates samples (sampling as in the recipe); the trainer recomputes the log-probs
of exactly those tokens; `mismatch.MismatchSums` summarises the gap (mean/max |delta|, KL k1/k3,
bitwise-equal fraction, mean e^|delta|) overall, by response position and by response length.
Generation is repeated at each engine batch size of a sweep, so batch variance shows up as a
difference between rows. `--layers` replays single samples through the engine's path (prefill,
then one token at a time against the KV cache) and the trainer's path (one forward) and diffs
every layer's hidden states, to find where a mismatch starts. For MoE models the engine records
its routing and the report adds the fraction of (token, layer, slot) where the trainer's routers
chose the same experts; `--set train.routing_replay=rollout` measures the log-prob gap with R3.

Engines and trainers come from their registries (`engine.backend`, `train.backend`); routing
agreement comes from the trainer's `last_pass_metrics`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from miles_core.algo.mismatch import MismatchSums, nan_max
from miles_core.checkpoint.loading import load_model
from miles_core.checks.layers import layer_diffs
from miles_core.checks.precision import load_engine_weights, precision_setup
from miles_core.config import MilesConfig
from miles_core.data import load_prompts
from miles_core.engine import ENGINE_BACKENDS, build_engine
from miles_core.errors import one_of
from miles_core.rl.manager import RolloutManager
from miles_core.train import TRAIN_BACKENDS, build_trainer
from miles_core.train.batch import TrainBatch

POSITION_BUCKETS = (0, 1, 8, 32, 128, 512)
LENGTH_BUCKETS = (1, 8, 32, 128)


@dataclass
class BatchResult:
    batch_size: int
    num_samples: int
    stats: dict[str, float]
    by_position: dict[str, dict[str, float]]
    by_length: dict[str, dict[str, float]]
    routing_agreement: float | None = None


@dataclass
class AlignReport:
    mode: str
    engine: str
    trainer: str
    dtype: str
    results: list[BatchResult] = field(default_factory=list)
    layers: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)
    precision: str = "recipe"
    """Low-precision pairing of trainer and engine (`checks/precision.py`)."""

    def worst(self, key: str) -> float:
        """Largest |value| over batch sizes; NaN if any is NaN (a NaN must fail a gate)."""
        return nan_max(*(abs(r.stats[key]) for r in self.results))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bucket_label(value: int, edges: tuple[int, ...]) -> str:
    lower = max(e for e in edges if e <= value)
    upper = [e for e in edges if e > lower]
    if not upper:
        return f"{lower}+"
    return str(lower) if upper[0] - 1 == lower else f"{lower}-{upper[0] - 1}"


def breakdown(pairs: list[tuple[torch.Tensor, torch.Tensor]], by: str) -> dict[str, dict[str, float]]:
    """Mismatch per response-position bucket (`by="position"`) or response-length bucket."""
    sums: dict[str, MismatchSums] = {}
    for trainer_lp, rollout_lp in pairs:
        if by == "length":
            sums.setdefault(_bucket_label(len(trainer_lp), LENGTH_BUCKETS), MismatchSums()).add(trainer_lp, rollout_lp)
            continue
        for pos in range(len(trainer_lp)):
            label = _bucket_label(pos, POSITION_BUCKETS)
            sums.setdefault(label, MismatchSums()).add(trainer_lp[pos : pos + 1], rollout_lp[pos : pos + 1])
    edges = POSITION_BUCKETS if by == "position" else LENGTH_BUCKETS
    order = [_bucket_label(e, edges) for e in edges]
    return {label: sums[label].metrics() for label in order if label in sums}


def run_align_check(cfg: MilesConfig, *, batch_sizes: list[int], num_prompts: int, engine: str = "native",
                    trainer: str = "native", layers: int = 0, precision: str = "recipe",
                    on_progress: Callable[[str], None] | None = None) -> AlignReport:
    """Generate with the engine at each batch size, rescore with the trainer, compare.
    `precision` picks a low-precision pairing of trainer and engine (`checks/precision.py`)."""
    if engine not in ENGINE_BACKENDS:
        raise one_of("engine", engine, tuple(ENGINE_BACKENDS))
    if trainer not in TRAIN_BACKENDS:
        raise one_of("trainer", trainer, tuple(TRAIN_BACKENDS))
    train_cfg, engine_quant = precision_setup(cfg.train, precision)
    prompts = load_prompts(replace(cfg.data, max_prompts=num_prompts))
    loaded = load_model(cfg.model, alignment_mode=cfg.alignment.mode)
    train = build_trainer(replace(train_cfg, backend=trainer), cfg.algo, copy.deepcopy(loaded.model),
                          temperature=cfg.sampling.temperature, total_steps=1)
    if engine_quant is not None:
        load_engine_weights(loaded.model, train.export_weights(), engine_quant)
    report = AlignReport(cfg.alignment.mode, engine, trainer, f"{cfg.model.dtype}/{cfg.train.compute_dtype}",
                         notes=_notes(cfg), precision=precision)
    for batch_size in _effective_batch_sizes(batch_sizes, len(prompts) * cfg.sampling.n_samples_per_prompt, report):
        if on_progress:
            on_progress(f"batch size {batch_size}")
        engine_cfg = replace(cfg.engine, backend=engine, max_batch_size=batch_size,
                             return_routed_experts=True)  # MoE only
        manager = RolloutManager(build_engine(engine_cfg, loaded), loaded.tokenizer, data=cfg.data,
                                 sampling=cfg.sampling, reward=cfg.reward)
        samples = [s for g in manager.generate_all(prompts) for s in g]
        batch = TrainBatch.from_samples(samples, [torch.zeros(s.response_length) for s in samples])
        trainer_lps = train.compute_log_probs(batch)
        pairs = [(t, torch.tensor(s.rollout_log_probs)) for t, s in zip(trainer_lps, samples)]
        total = MismatchSums()
        for t, r in pairs:
            total.add(t, r)
        report.results.append(BatchResult(batch_size, len(samples), total.metrics(), breakdown(pairs, "position"),
                                          breakdown(pairs, "length"),
                                          train.last_pass_metrics().get("routing_agreement")))
    if layers:
        report.layers = layer_diffs(loaded.model, train, samples[:layers], cfg.sampling.temperature)
    return report


def _effective_batch_sizes(requested: list[int], num_sequences: int, report: AlignReport) -> list[int]:
    """A batch cannot hold more sequences than there are: report the size that actually runs."""
    sizes: list[int] = []
    for size in requested:
        ran = min(size, num_sequences)
        if ran != size:
            report.notes.append(f"batch size {size} ran as {ran}: there are only {num_sequences} sequences "
                                "(prompts x n_samples_per_prompt)")
        if ran not in sizes:
            sizes.append(ran)
    return sizes


def _notes(cfg: MilesConfig) -> list[str]:
    notes = []
    if cfg.sampling.top_k != -1 or cfg.sampling.top_p < 1:
        notes.append("top-k/top-p filtering is on: the engine reports log-probs of the filtered distribution, "
                     "the trainer of the full one, so they differ by design")
    if cfg.alignment.mode == "invariant" and cfg.train.compute_dtype != cfg.model.dtype:
        notes.append(f"engine dtype {cfg.model.dtype} != trainer compute dtype {cfg.train.compute_dtype}: "
                     "invariant kernels cannot make them equal")
    return notes
