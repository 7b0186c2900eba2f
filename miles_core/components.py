"""Everything one training run is made of, built from the config: model, engine, trainer,
prompt stream, the run folder, and how a step's samples are obtained and stored.

Kept apart from `loop.py` so the loop reads like the algorithm.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from miles_core import config_tree
from miles_core.config import MilesConfig
from miles_core.errors import MilesError
from miles_core.sample import Sample, read_samples_jsonl, write_samples_jsonl
from miles_core.utils.io import atomic_write


@dataclass
class RunComponents:
    cfg: MilesConfig
    output_dir: Path
    loaded: object  # LoadedModel of the engine side (tokenizer, hf config, source path)
    engine: object | None
    trainer: object | None
    prompts: object | None  # PromptStream
    rollout_data: str | None
    save_all_rollouts: bool
    eval_sets: list = field(default_factory=list)  # EvalSet per eval dataset; empty without an engine

    @classmethod
    def create(cls, cfg: MilesConfig, output_dir: Path, *, mode: str, rollout_data: str | None) -> RunComponents:
        from miles_core.data import load_prompts
        from miles_core.data.lengths import check_batch_fits, fit_prompts
        from miles_core.engine import build_engine
        from miles_core.eval import fit_eval_sets, load_eval_sets
        from miles_core.models.loading import load_model
        from miles_core.rollout import PromptStream, render_prompts
        from miles_core.train import build_trainer

        if mode == "train_only" and not rollout_data:
            raise MilesError("--debug-train-only needs --load-debug-rollout-data PATH (a file, or a template with {rollout_id})")
        records = load_prompts(cfg.data) if mode != "train_only" else None  # bad data fails fast
        eval_sets = load_eval_sets(cfg.eval) if records is not None else []
        _check_output_dir(output_dir)
        loaded = load_model(cfg.model, alignment_mode=cfg.alignment.mode)
        engine = prompts = trainer = None
        if records is not None:
            engine = build_engine(cfg.engine, loaded)
            records, ids = fit_prompts(records, render_prompts(records, loaded.tokenizer, cfg.data), cfg.data,
                                       engine.max_context_len)
            check_batch_fits({"rollout.batch_size": cfg.rollout.batch_size,
                              "algo.over_sampling_batch_size": cfg.algo.over_sampling_batch_size}, records, cfg.data)
            eval_sets = fit_eval_sets(eval_sets, loaded.tokenizer, engine.max_context_len)
            prompts = PromptStream(records, ids,
                                   shuffle=cfg.data.shuffle, seed=cfg.data.seed, first_request_seed=cfg.sampling.seed)
        if mode != "rollout_only":
            total = cfg.loop.num_rollout * cfg.train.num_steps_per_rollout
            trainer = build_trainer(cfg.train, cfg.algo, copy.deepcopy(loaded.model),
                                    temperature=cfg.sampling.temperature, total_steps=total)
        _write_config(cfg, output_dir)  # only once everything is built: a failed start leaves no folder
        save_all = cfg.loop.save_rollout_data or mode == "rollout_only"
        return cls(cfg, output_dir, loaded, engine, trainer, prompts, rollout_data, save_all, eval_sets)

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

    def evaluate(self) -> dict[str, float]:
        """`eval/<name>/*` metrics of the engine's current weights on every eval dataset."""
        from miles_core.eval import evaluate

        return evaluate(self.engine, self.loaded.tokenizer, self.eval_sets)

    def generate_groups(self, num_prompts: int) -> list[list[Sample]]:
        """The next `num_prompts` prompts of the stream, a group of `n_samples_per_prompt` samples each."""
        from miles_core.rollout import generate_group_samples

        batch, ids, first_seed = self.prompts.next_batch(num_prompts)
        return generate_group_samples(self.engine, batch, ids, self.cfg.sampling, first_seed=first_seed)

    def load_rollout(self, step: int) -> list[Sample]:
        """This step's samples from saved rollout data (`--debug-train-only`)."""
        path = Path(rollout_data_path(self.rollout_data, step))
        samples = list(read_samples_jsonl(path))
        group = self.cfg.sampling.n_samples_per_prompt
        if not samples or len(samples) % group:
            raise MilesError(f"'{path}' holds {len(samples)} samples; expected a non-zero multiple of "
                             f"sampling.n_samples_per_prompt ({group})")
        return samples

    def save_rollout_data(self, step: int, samples: list[Sample]) -> None:
        if self.save_all_rollouts:
            write_samples_jsonl(samples, self.output_dir / "rollouts" / f"step_{step:06d}.jsonl")

    def save_checkpoint(self, step: int) -> Path:
        """HF checkpoint of the trainer's weights (loads in `transformers`), with the tokenizer."""
        from miles_core.checkpoint.hf import save_hf_checkpoint

        path = self.output_dir / "checkpoints" / f"step_{step + 1:06d}"
        save_hf_checkpoint(path, self.trainer.export_weights(), self.loaded.hf_config, source_dir=self.loaded.path)
        return path


def rollout_data_path(template: str, step: int) -> str:
    """A fixed file, or a template such as `rollouts/step_{rollout_id:06d}.jsonl`."""
    if "{rollout_id" not in template:
        return template
    try:
        return template.format(rollout_id=step)
    except (KeyError, IndexError, ValueError) as err:
        raise MilesError(f"bad rollout data template '{template}': {err!r}; expected e.g. "
                         "'rollouts/step_{rollout_id:06d}.jsonl'") from None


def _check_output_dir(output_dir: Path) -> None:
    """A folder is taken once a run wrote metrics; one holding only config.toml is reused."""
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        raise MilesError(f"output dir '{output_dir}' already holds a run (metrics.jsonl); choose another --output-dir")


def _write_config(cfg: MilesConfig, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(output_dir / "config.toml") as handle:
        handle.write(config_tree.dump_toml(cfg))
