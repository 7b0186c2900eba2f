"""Servers for the serve tests: `miles serve` in a thread of the test process, on 127.0.0.1 at a
free port, always stopped. One tiny-qwen3 server is shared by a module's tests."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from miles_core.config import load_config
from miles_core.serve import ServeOptions, ServerThread, build_state


def start(recipe: str = "tiny", overrides=(), **options):
    state = build_state(load_config(recipe, list(overrides)), ServeOptions(port=0, **options))
    return state, ServerThread(state)


@pytest.fixture(scope="module")
def served():
    """(url, state) of a tiny-qwen3 server with weight updates allowed and /tmp an allowed root."""
    state, thread = start(allow_unauthenticated_weight_updates=True)
    with thread as url:
        yield url, state


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served[0], timeout=60) as http:
        yield http


def with_options(state, **changes):
    state.options = dataclasses.replace(state.options, **changes)
