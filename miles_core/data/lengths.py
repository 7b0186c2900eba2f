"""Prompt lengths against the engine's context, checked before the first step: a prompt that
leaves no room for one generated token fails the run now (naming the prompt and where it is), or
is skipped with a count (`data.on_long_prompt = "skip"`), instead of killing a run mid-way."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from miles_core.config import DataConfig
from miles_core.data.datasets import prompt_location
from miles_core.errors import MilesError
from miles_core.sample import Sample

log = logging.getLogger("miles")


def fit_prompts(prompts: Sequence[Sample], prompt_ids: Sequence[list[int]], cfg: DataConfig,
                context_len: int) -> tuple[list[Sample], list[list[int]]]:
    """The prompts (and their token ids) that fit `context_len` with one token to generate."""
    limit = context_len - 1
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) > limit]
    if not too_long:
        return list(prompts), list(prompt_ids)
    first = too_long[0]
    if cfg.on_long_prompt == "error" or len(too_long) == len(prompts):
        text = " ".join(str(prompts[first].prompt).split())
        raise MilesError(
            f"{prompt_location(cfg, prompts[first].index)}: prompt {text[:60]!r}{'...' if len(text) > 60 else ''} "
            f"has {len(prompt_ids[first])} tokens; the limit is {limit} (context {context_len}: engine.max_context_len "
            f"or the model's max_position_embeddings, minus 1 token to generate); {len(too_long)} of {len(prompts)} "
            "prompts are too long: shorten them or set data.on_long_prompt = \"skip\"")
    log.warning("skipped %d of %d prompts longer than %d tokens (data.on_long_prompt = \"skip\")",
                len(too_long), len(prompts), limit)
    skip = set(too_long)
    keep = [i for i in range(len(prompts)) if i not in skip]
    return [prompts[i] for i in keep], [prompt_ids[i] for i in keep]


def check_batch_fits(sizes: dict[str, int], prompts: Sequence[Sample], cfg: DataConfig) -> None:
    """A step draws its prompts without repeats: a batch size (config key -> value) above the
    number of prompts is a mistake (the step would repeat prompts; a typo like 100000000 would
    build a batch until the process is OOM-killed)."""
    for key, size in sizes.items():
        if size > len(prompts):
            source = f"'{cfg.path}'" if cfg.path else f"task '{cfg.task}'"
            raise MilesError(f"{key} = {size} is more than the {len(prompts)} prompts of {source}; a step would "
                             f"repeat prompts: set it to at most {len(prompts)} or add prompts")
