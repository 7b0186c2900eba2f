"""Rollout manager: prompts -> engine requests -> `Sample`s, and the `miles rollout` command.

It turns prompt records into token ids once (chat template applied here, never again), asks
the engine for `n_samples_per_prompt` responses per prompt, and fills every `Sample` field the
trainer needs. Seeds are derived from the sampling seed and the prompt's global index, so the
same prompt in the same position gets the same samples in every run.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from miles_core.config import DataConfig, MilesConfig, SamplingConfig
from miles_core.engine.protocol import GenerateRequest, Generation, RolloutEngine
from miles_core.sample import Sample, Status


def render_prompts(prompts: Sequence[Sample], tokenizer, data_cfg: DataConfig) -> list[list[int]]:
    from miles_core.data import render_prompt

    return [render_prompt(p.prompt, tokenizer, data_cfg) for p in prompts]


def generate_group_samples(engine: RolloutEngine, prompts: Sequence[Sample], prompt_ids: Sequence[list[int]],
                           sampling: SamplingConfig, *, first_seed: int,
                           on_progress: Callable[[int], None] | None = None) -> list[list[Sample]]:
    """One group of `n_samples_per_prompt` samples per prompt, in prompt order."""
    requests = [
        GenerateRequest(input_ids=ids, sampling=sampling, seed=first_seed + i, rid=f"prompt-{p.index}")
        for i, (p, ids) in enumerate(zip(prompts, prompt_ids))
    ]
    outputs = engine.generate(requests, on_progress=on_progress)
    groups, index = [], 0
    for group_index, (prompt, ids, generations) in enumerate(zip(prompts, prompt_ids, outputs)):
        group = []
        for generation in generations:
            group.append(_to_sample(prompt, ids, generation, index=index, group_index=group_index))
            index += 1
        groups.append(group)
    return groups


def _to_sample(prompt: Sample, prompt_ids: list[int], gen: Generation, *, index: int, group_index: int) -> Sample:
    status = {"stop": Status.COMPLETED, "length": Status.TRUNCATED}.get(gen.finish_reason["type"], Status.ABORTED)
    return Sample(
        index=index, group_index=group_index, prompt=prompt.prompt,
        tokens=list(prompt_ids) + list(gen.output_ids), response=gen.text,
        response_length=len(gen.output_ids), label=prompt.label,
        loss_mask=[1] * len(gen.output_ids), status=status,
        metadata={**prompt.metadata, "finish_reason": gen.finish_reason},
        rollout_log_probs=list(gen.output_logprobs), rollout_routed_experts=gen.routed_experts,
        weight_versions=[gen.weight_version],
    )


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
    from miles_core import config_tree
    from miles_core.data import load_prompts
    from miles_core.data.lengths import fit_prompts
    from miles_core.engine import build_engine
    from miles_core.models.loading import load_model
    from miles_core.sample import write_samples_jsonl
    from miles_core.utils.io import atomic_write

    prompts = load_prompts(cfg.data)
    loaded = load_model(cfg.model, alignment_mode=cfg.alignment.mode)
    prompt_ids = render_prompts(prompts, loaded.tokenizer, cfg.data)
    engine = build_engine(cfg.engine, loaded)
    prompts, prompt_ids = fit_prompts(prompts, prompt_ids, cfg.data, engine.max_context_len)
    if on_start:
        on_start(len(prompts) * cfg.sampling.n_samples_per_prompt)
    start = time.perf_counter()
    groups = generate_group_samples(engine, prompts, prompt_ids, cfg.sampling, first_seed=cfg.sampling.seed,
                                    on_progress=on_progress)
    seconds = time.perf_counter() - start
    samples = [s for group in groups for s in group]
    write_samples_jsonl(samples, output)
    with atomic_write(output.with_name(output.stem + ".config.toml")) as handle:
        handle.write(config_tree.dump_toml(cfg))
    reasons = Counter(s.metadata["finish_reason"]["type"] for s in samples)
    return RolloutSummary(len(prompts), len(samples), sum(s.response_length for s in samples), seconds,
                          dict(reasons), output)


def with_prompt_data(cfg: MilesConfig, prompt_data: str | None) -> MilesConfig:
    """`--prompt-data F` replaces the recipe's prompt source with a file."""
    if not prompt_data:
        return cfg
    return replace(cfg, data=replace(cfg.data, path=prompt_data, task=""))


class PromptStream:
    """Endless prompt batches for training: the prompt set in a fresh shuffled order each epoch.

    Every drawn prompt gets the next request seed, so a run is reproducible and no two steps
    sample with the same seeds.
    """

    def __init__(self, prompts: Sequence[Sample], prompt_ids: Sequence[list[int]], *, shuffle: bool,
                 seed: int, first_request_seed: int) -> None:
        import random

        self.prompts, self.prompt_ids = list(prompts), list(prompt_ids)
        self.shuffle, self._rng = shuffle, random.Random(seed)
        self._order: list[int] = []
        self._next_seed = first_request_seed

    def next_batch(self, size: int) -> tuple[list[Sample], list[list[int]], int]:
        """(prompts, their token ids, the request seed of the first one)."""
        picked = []
        while len(picked) < size:
            if not self._order:
                self._order = list(range(len(self.prompts)))
                if self.shuffle:
                    self._rng.shuffle(self._order)
            picked.append(self._order.pop(0))
        first_seed, self._next_seed = self._next_seed, self._next_seed + size
        return [self.prompts[i] for i in picked], [self.prompt_ids[i] for i in picked], first_seed
