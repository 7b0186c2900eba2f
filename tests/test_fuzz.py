"""Fuzz (issue 21, item 8): random JSONL records and recipe overrides fed to the loaders give
a result or a documented error (`MilesError`: one line, the CLI's exit code 2), never another
exception. Bounded (examples, deadline) so the suite stays fast. Random bodies for every HTTP
route of `miles serve` are in tests/serve/test_serve_fuzz.py."""

from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from miles_core.config import DataConfig, MilesConfig
from miles_core.config.tree import apply_overrides, build, load_recipe
from miles_core.data import load_prompts
from miles_core.errors import MilesError
from miles_core.sample import read_samples_jsonl

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                                max_size=3), max_leaves=8)
records = st.dictionaries(st.sampled_from(["prompt", "label", "metadata", "tokens", "response", "reward", "index",
                                           "status", "loss_mask", "x"]), values, max_size=5) | values
raw_lines = st.lists(records.map(lambda r: json.dumps(r, allow_nan=True)) | st.text(max_size=30), min_size=0, max_size=5)


def _write(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@FUZZ
@given(lines=raw_lines)
def test_prompt_files_load_or_fail_with_a_miles_error(tmp_path, lines):
    path = tmp_path / "prompts.jsonl"
    _write(path, lines)
    try:
        prompts = load_prompts(DataConfig(path=str(path), input_key="prompt", label_key="label"))
    except MilesError as err:
        assert str(err)
    else:
        assert prompts and all(isinstance(p.prompt, (str, list)) for p in prompts)


@FUZZ
@given(lines=raw_lines)
def test_sample_files_load_or_fail_with_a_miles_error(tmp_path, lines):
    path = tmp_path / "samples.jsonl"
    _write(path, lines)
    try:
        list(read_samples_jsonl(path))
    except MilesError:
        pass


KEYS = ["loop.num_rollout", "loop.save_interval", "loop.keep_last", "train.lr", "train.max_bad_steps", "train.clip_grad",
        "sampling.temperature", "sampling.top_p", "sampling.n_samples_per_prompt", "rollout.batch_size", "reward.timeout",
        "algo.eps_clip", "algo.advantage_estimator", "data.on_long_prompt", "model.dtype", "engine.max_batch_size",
        "train.nonexistent", "nosection.key", "loop", "train.lr.deeper"]
literal = st.sampled_from(["0", "-1", "1", "2", "1e309", "nan", "-inf", "true", "'x'", "[1, 2]", "{a = 1}", "[", "\"",
                           "3.5", "grpo", "float32"]) | st.text(alphabet=string.printable, max_size=8)


@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), literal).map("=".join), max_size=4))
def test_recipe_overrides_build_or_fail_with_a_miles_error(overrides):
    try:
        build(MilesConfig, apply_overrides(load_recipe("tiny"), overrides, MilesConfig))
    except MilesError as err:
        assert str(err)
