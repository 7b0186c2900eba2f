"""Fixtures shared by the trainer tests."""

from __future__ import annotations

import pytest

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
