"""Everything one training run is made of, built from the config: model, engine, trainer, the
rollout manager (or saved samples), the weight sync, eval sets, and the run folder.

Kept apart from `loop.py` so the loop reads like the algorithm. Engines, trainers and weight-sync
transports come from their registries (`engine.backend`, `train.backend`, `sync.transport`). In
async mode (`loop.mode`) one `AsyncRollouts` is both the rollout source and the weight sync: the
loop reads the same in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch.distributed as dist
from torch import nn

from miles_core.checkpoint.loading import LoadedModel, load_model
from miles_core.config import MilesConfig
from miles_core.config.tree import dump_toml
from miles_core.data import load_prompts
from miles_core.engine import build_engine, close_engine
from miles_core.engine.servers import LaunchContext
from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import MilesError
from miles_core.rl.async_loop import AsyncRollouts
from miles_core.rl.colocate import Colocation
from miles_core.rl.eval import EvalSet, evaluate, fit_eval_sets, load_eval_sets
from miles_core.rl.manager import RolloutManager, RolloutSource, SavedRollouts, rollout_data_path
from miles_core.quant.modules import dense_copy
from miles_core.rl.partial import PartialRollouts
from miles_core.rl.rank_engines import engine_of_ranks
from miles_core.sample import Sample, write_samples_jsonl
from miles_core.sync import SyncContext, WeightSync, build_weight_sync
from miles_core.train import build_trainer, needs_reference
from miles_core.train.protocol import TrainBackend
from miles_core.utils.io import atomic_write


@dataclass
class RunComponents:
    cfg: MilesConfig
    output_dir: Path
    loaded: LoadedModel
    """The engine side's model, tokenizer, HF config and source path."""
    engine: RolloutEngine | None
    trainer: TrainBackend | None
    rollouts: RolloutSource
    sync: WeightSync | None
    save_all_rollouts: bool
    eval_sets: list[EvalSet] = field(default_factory=list)
    """One per eval dataset; empty without an engine."""
    colocation: Colocation = field(default_factory=Colocation)
    """`engine.colocate`: engine and trainer take turns on the GPUs (off: does nothing)."""

    @classmethod
    def create(cls, cfg: MilesConfig, output_dir: Path, *, mode: str, rollout_data: str | None,
               resuming: bool = False) -> RunComponents:
        """Everything the run needs. `resuming`: `output_dir` may hold the run being continued."""
        if mode == "rollout_only" and resuming:
            raise MilesError("--debug-rollout-only writes no checkpoints, so there is nothing to resume")
        if mode == "train_only" and not rollout_data:
            raise MilesError("--debug-train-only needs --load-debug-rollout-data PATH (a file, or a template with {rollout_id})")
        records = load_prompts(cfg.data) if mode != "train_only" else None  # bad data fails fast
        eval_sets = load_eval_sets(cfg.eval) if records is not None else []
        if not resuming:
            _check_output_dir(output_dir)
        loaded = load_model(cfg.model, alignment_mode=cfg.alignment.mode, quantized=cfg.engine.weights == "quantized")
        engine = None
        if records is not None:
            engine = build_engine(cfg.engine, loaded, _launch_context(cfg, output_dir))
        try:
            return cls._create(cfg, output_dir, mode, rollout_data, resuming, records, eval_sets, loaded, engine)
        except BaseException:
            close_engine(engine)  # launched servers stop with a failed start
            raise

    @classmethod
    def _create(cls, cfg: MilesConfig, output_dir: Path, mode: str, rollout_data: str | None, resuming: bool,
                records, eval_sets: list[EvalSet], loaded: LoadedModel, engine: RolloutEngine | None) -> RunComponents:
        trainer = sync = None
        if mode != "rollout_only":
            trainer = build_run_trainer(cfg, loaded)
        rollouts: RolloutSource = SavedRollouts(rollout_data or "", cfg.sampling, cfg.reward)
        if engine is not None:
            engine = engine_of_ranks(cfg, engine, trainer)  # engine.ranks = "all": one on every rank
            rollouts = RolloutManager(engine, loaded.tokenizer, data=cfg.data, sampling=cfg.sampling, reward=cfg.reward,
                                      algo=cfg.algo, batch_size=cfg.rollout.batch_size, prompts=records,
                                      partial=_partial(cfg), rollout=cfg.rollout)
            eval_sets = fit_eval_sets(eval_sets, engine, loaded.tokenizer, cfg.rollout)  # long prompts fail before step 0
        if engine is not None and trainer is not None:
            qat_modules = cfg.train.qat_modules if cfg.train.qat != "off" else ()
            context = SyncContext(loaded.hf_config, loaded.path, output_dir / "weight_sync", qat_modules)
            sync = build_weight_sync(cfg.sync, engine, context)
            if cfg.sync.quantize != "off" and not resuming:  # the engine starts on the quantised weights too
                sync.push(trainer.export_weights(), version=engine.weight_version)
        _write_config(cfg, output_dir)  # only once everything is built: a failed start leaves no folder
        save_all = cfg.loop.save_rollout_data or bool(cfg.loop.save_rollout_data_path) or mode == "rollout_only"
        parts = cls(cfg, output_dir, loaded, engine, trainer, rollouts, sync, save_all, eval_sets)
        if cfg.engine.colocate:
            parts.colocation = Colocation(engine, trainer, keep_weights=cfg.engine.weights_cpu_backup)
        if cfg.loop.mode == "async" and sync is not None:  # debug modes have nothing to overlap
            parts.rollouts = parts.sync = AsyncRollouts(
                rollouts, sync, lag=cfg.rollout_lag, steps_per_rollout=cfg.train.num_steps_per_rollout,
                num_rollout=cfg.loop.num_rollout, should_eval=parts.should_eval, evaluate=parts.evaluate_now)
        return parts

    def start(self, first_step: int) -> None:
        """Start background generation (async mode) at `first_step`, once the run is restored."""
        if isinstance(self.rollouts, AsyncRollouts):
            self.rollouts.start(first_step)

    def close(self) -> None:
        """Stop background generation (async mode), leave the weight-sync group (`nccl`), stop
        the engine (launched servers stop with it) and let the trainer leave a group it started."""
        try:
            if isinstance(self.rollouts, AsyncRollouts):
                self.rollouts.close()
            sync = self.sync.sync if isinstance(self.sync, AsyncRollouts) else self.sync
            if callable(getattr(sync, "close", None)):
                sync.close()
        finally:
            close_engine(self.engine)
            if callable(getattr(self.trainer, "close", None)):
                self.trainer.close()

    def should_eval(self, step: int) -> bool:
        """Whether the weights after `step` updates are evaluated: before training (step 0),
        every `eval.eval_interval` steps, and after the last step. Needs an engine; in rollout-only
        mode the weights never change, so only step 0."""
        cfg = self.cfg.eval
        if not self.eval_sets:
            return False
        if step == 0:
            return not cfg.skip_eval_before_train
        if self.trainer is None:
            return False
        return step == self.cfg.loop.num_rollout or (cfg.eval_interval > 0 and step % cfg.eval_interval == 0)

    def evaluate(self, step: int) -> dict[str, float]:
        """`eval/<name>/*` metrics of the weights after `step` updates (async mode: evaluated by
        the rollout thread when it applies them, with `eval/weight_version`)."""
        if isinstance(self.rollouts, AsyncRollouts):
            return self.rollouts.evaluation(step)
        return self.evaluate_now()

    def evaluate_now(self) -> dict[str, float]:
        """`eval/<name>/*` metrics of the engine's current weights on every eval dataset."""
        return evaluate(self.engine, self.loaded.tokenizer, self.eval_sets, rollout=self.cfg.rollout)

    def save_rollout_data(self, step: int, samples: list[Sample]) -> None:
        """Each step's samples as JSONL: `loop.save_rollout_data_path` (templated like
        `--load-debug-rollout-data`) or `<run>/rollouts/step_NNNNNN.jsonl`."""
        if not self.save_all_rollouts:
            return
        template = self.cfg.loop.save_rollout_data_path
        path = Path(rollout_data_path(template, step)) if template else \
            self.output_dir / "rollouts" / f"step_{step:06d}.jsonl"
        write_samples_jsonl(samples, path)


def build_run_trainer(cfg: MilesConfig, loaded: LoadedModel) -> TrainBackend:
    """The run's trainer on a copy of the loaded weights (every trainer rank builds it alike)."""
    total = cfg.loop.num_rollout * cfg.train.num_steps_per_rollout
    return build_trainer(cfg.train, cfg.algo, dense_copy(loaded.model), reference=_reference(cfg, loaded),
                         temperature=cfg.sampling.temperature, total_steps=total)


def _launch_context(cfg: MilesConfig, output_dir: Path) -> LaunchContext:
    """What launched servers need from the run: the GPUs the trainer ranks take (one per rank of
    this process group, 0..N-1), the folder the disk weight sync writes, the alignment mode."""
    sync_dir = Path(cfg.sync.disk_dir) if cfg.sync.disk_dir else output_dir / "weight_sync"
    ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return LaunchContext(trainer_gpus=ranks, weight_roots=(str(sync_dir.resolve()),),
                         alignment_mode=cfg.alignment.mode)


def _partial(cfg: MilesConfig) -> PartialRollouts | None:
    if not cfg.rollout.partial:
        return None
    return PartialRollouts(mask_offpolicy_prefix=cfg.rollout.mask_offpolicy_prefix,
                           max_staleness=cfg.loop.max_staleness, steps_per_rollout=cfg.train.num_steps_per_rollout)


def _reference(cfg: MilesConfig, loaded: LoadedModel) -> nn.Module | None:
    """The reference model from `model.ref_source` (None: the trainer copies the starting weights)."""
    if not cfg.model.ref_source or not needs_reference(cfg.algo):
        return None
    reference = load_model(replace(cfg.model, source=cfg.model.ref_source), alignment_mode=cfg.alignment.mode).model
    ours, theirs = loaded.model.lm_head.weight.shape[0], reference.lm_head.weight.shape[0]
    if ours != theirs:
        raise MilesError(f"model.ref_source '{cfg.model.ref_source}' has a vocabulary of {theirs} tokens, the policy "
                         f"'{cfg.model.source}' {ours}: the reference must share the policy's tokenizer")
    return reference


def _check_output_dir(output_dir: Path) -> None:
    """A folder is taken once a run wrote metrics; one holding only config.toml is reused."""
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        raise MilesError(f"output dir '{output_dir}' already holds a run (metrics.jsonl); choose another --output-dir")


def _write_config(cfg: MilesConfig, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(output_dir / "config.toml") as handle:
        handle.write(dump_toml(cfg))
