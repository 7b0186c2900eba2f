"""`miles rollout`: generate samples for every prompt of a prompt set and write them as JSONL."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from miles_core.checkpoint.loading import load_model
from miles_core.config import MilesConfig
from miles_core.config.tree import dump_toml
from miles_core.data import load_prompts
from miles_core.engine import build_engine, close_engine
from miles_core.rl.manager import RolloutManager
from miles_core.sample import write_samples_jsonl
from miles_core.utils.io import atomic_write


@dataclass
class RolloutSummary:
    """What `miles rollout` reports."""

    num_prompts: int
    num_samples: int
    response_tokens: int
    seconds: float
    finish_reasons: dict[str, int] = field(default_factory=dict)
    output: Path | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.response_tokens / max(self.seconds, 1e-9)

    @property
    def mean_response_length(self) -> float:
        return self.response_tokens / max(self.num_samples, 1)


def run_rollout(cfg: MilesConfig, output: Path, *, on_start: Callable[[int], None] | None = None,
                on_progress: Callable[[int], None] | None = None) -> RolloutSummary:
    """`miles rollout`: generate samples for every prompt of `cfg.data` and write them as JSONL.

    The JSONL and the resolved recipe (`<output stem>.config.toml`) appear only when complete.
    """
    prompts = load_prompts(cfg.data)
    loaded = load_model(cfg.model, alignment_mode=cfg.alignment.mode, quantized=cfg.engine.weights == "quantized")
    engine = build_engine(cfg.engine, loaded)
    try:
        manager = RolloutManager(engine, loaded.tokenizer, data=cfg.data, sampling=cfg.sampling, reward=cfg.reward,
                                 rollout=cfg.rollout)
        prompts = manager.fit(prompts)[0]  # long prompts fail (or are skipped) before any generation
        if on_start:
            on_start(len(prompts) * cfg.sampling.n_samples_per_prompt)
        start = time.perf_counter()
        groups = manager.generate_all(prompts, on_progress=on_progress)
        seconds = time.perf_counter() - start
    finally:
        close_engine(engine)  # launched servers stop with the job
    samples = [s for group in groups for s in group]
    write_samples_jsonl(samples, output)
    with atomic_write(output.with_name(output.stem + ".config.toml")) as handle:
        handle.write(dump_toml(cfg))
    reasons = Counter(s.metadata["finish_reason"]["type"] for s in samples)
    return RolloutSummary(len(prompts), len(samples), sum(s.response_length for s in samples), seconds,
                          dict(reasons), output)


def with_prompt_data(cfg: MilesConfig, prompt_data: str | None) -> MilesConfig:
    """`--prompt-data F` replaces the recipe's prompt source with a file."""
    if not prompt_data:
        return cfg
    return replace(cfg, data=replace(cfg.data, path=prompt_data, task=""))
