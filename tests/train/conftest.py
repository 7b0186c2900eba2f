"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import pytest
import torch

from miles_core.config import ModelConfig
from miles_core.checkpoint.loading import load_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("MILES_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        return load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model
    finally:
        patch.undo()


def grouped_tokens(gen: torch.Generator) -> tuple[list[torch.Tensor], list[int]]:
    """3 prompts (lengths 5, 9, 3) x 3 samples with response lengths 1..5, token ids below 300:
    (tokens, response lengths); drawn from `gen`, so callers continue the same stream."""
    tokens, lengths = [], []
    for i, prompt_len in enumerate((5, 9, 3)):
        prompt = torch.randint(0, 300, (prompt_len,), generator=gen)
        for j in range(3):
            r = 1 + (3 * i + j) % 5
            tokens.append(torch.cat([prompt, torch.randint(0, 300, (r,), generator=gen)]))
            lengths.append(r)
    return tokens, lengths
