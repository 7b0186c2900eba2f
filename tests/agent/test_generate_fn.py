"""The generate-function contract (slime's --custom-generate-function-path): loading by dotted
path, one-line errors for a bad path, signature or return value, list returns, and timeouts: a
stuck sample is aborted (its engine request too) and counted, and never hangs the step."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles_core.checkpoint.loading import load_model
from miles_core.config import DataConfig, EngineConfig, ModelConfig, RewardConfig, RolloutConfig, SamplingConfig
from miles_core.engine.native import NativeEngine
from miles_core.errors import MilesError
from miles_core.rl.generate_fn import agent_metrics, load_generate_function
from miles_core.rl.manager import RolloutManager
from miles_core.sample import Sample, Status

GEN = "generate function (rollout.generate_function)"


@pytest.fixture(autouse=True)
def plugins_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("MILES_CACHE", str(tmp_path_factory.mktemp("cache")))
    model = load_model(ModelConfig(source="tiny-qwen3", device="cpu"), alignment_mode="invariant")
    patch.undo()
    return model


def manager(loaded, *, n: int = 2, **rollout) -> RolloutManager:
    engine = NativeEngine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=8), eos_token_ids=(),
                          max_position_embeddings=512)
    return RolloutManager(engine, loaded.tokenizer, data=DataConfig(), reward=RewardConfig(type="last_number"),
                          sampling=SamplingConfig(max_new_tokens=6, n_samples_per_prompt=n),
                          rollout=RolloutConfig(**rollout))


PROMPTS = [Sample(prompt="What is 1 + 2?", label="3", index=0), Sample(prompt="What is 4 + 4?", label="8", index=1)]


@pytest.mark.parametrize("path, message", [
    ("agent_plugins:nope", "'agent_plugins' has no attribute 'nope'"),
    ("no_module_xyz:f", "cannot import module 'no_module_xyz'"),
    ("generate", "'generate' must be a 'package.module:function' path"),
    ("agent_plugins:two_args", "must take async (ctx, sample, sampling) -> Sample | list[Sample], but its signature is"),
    ("agent_plugins:not_async", "must be an async function (async def fn(ctx, sample, sampling))"),
])
def test_bad_paths_and_signatures_fail_with_one_line(path, message):
    with pytest.raises(MilesError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")
                       .replace("[", r"\[").replace("]", r"\]")) as err:
        load_generate_function(path)
    assert str(err.value).startswith(GEN) and "\n" not in str(err.value)


@pytest.mark.parametrize("path, message", [
    ("agent_plugins:returns_none", "must return a Sample or a non-empty list of Samples, got NoneType None"),
    ("agent_plugins:bad_mask", "returned a bad Sample: loss_mask has 1 entries, expected response_length = 2"),
    ("agent_plugins:raises", "generate function 'agent_plugins:raises' raised RuntimeError: boom (prompt 0"),
])
def test_bad_return_values_fail_with_one_line(loaded, path, message):
    with pytest.raises(MilesError, match=message.replace("(", r"\(")):
        manager(loaded, generate_function=path).generate_all(PROMPTS[:1])


def test_token_in_token_out_samples_do_not_depend_on_concurrency(loaded):
    """Sample j of prompt i has its own seed: the same tokens and log-probs whether the engine runs
    the concurrent requests together (batch 8) or one at a time (batch 1), in invariant mode."""
    runs = []
    for batch in (8, 1):
        rollouts = manager(loaded, generate_function="agent_plugins:one_turn")
        rollouts.engine = NativeEngine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=batch),
                                       eos_token_ids=(), max_position_embeddings=512)
        runs.append(sum(rollouts.generate_all(PROMPTS), []))
    default = sum(manager(loaded).generate_all(PROMPTS), [])
    for mine, again, theirs in zip(*runs, default):
        assert (mine.tokens, mine.rollout_log_probs) == (again.tokens, again.rollout_log_probs)
        assert mine.tokens[:mine.prompt_length] == theirs.tokens[:theirs.prompt_length]  # same rendered prompt
        assert mine.response_length == 6 and mine.status == Status.COMPLETED
    assert len({tuple(s.tokens) for s in runs[0]}) == 4  # every sample drew its own tokens


def test_list_returns_are_rows_of_the_group_and_training_needs_n_per_prompt(loaded):
    rows = manager(loaded, generate_function="agent_plugins:two_rows").generate_all(PROMPTS)
    assert [len(g) for g in rows] == [4, 4] and {s.group_index for s in rows[1]} == {1}
    train = manager(loaded, generate_function="agent_plugins:two_rows")
    train.batch_size, train.stream = 2, train._training_stream(PROMPTS)
    with pytest.raises(MilesError, match=r"groups of \[4\] rows; training needs sampling.n_samples_per_prompt = 2"):
        train.collect(0)


def test_a_stuck_sample_is_aborted_in_the_engine_and_counted(loaded):
    rollouts = manager(loaded, generate_function="agent_plugins:stuck_in_engine", sample_timeout_s=0.3)
    rollouts.engine.pause()  # requests wait for ever: only the timeout ends them
    groups = rollouts.generate_all(PROMPTS)
    answered, stuck = groups
    assert [s.status for s in answered] == [Status.COMPLETED] * 2 and [s.reward for s in answered] == [1.0, 1.0]
    assert [s.status for s in stuck] == [Status.ABORTED] * 2
    for sample in stuck:  # trains nothing, keeps the group's size, scores 0
        assert (sample.reward, sample.loss_mask, sample.response_length) == (0.0, [0], 1)
        assert sample.metadata["abort_reason"] == "sample_timeout"
    rollouts.engine.resume()
    rollouts.engine.step()  # the aborts were queued while paused: the sequences are gone
    assert rollouts.engine._handles == {} and not rollouts.engine.scheduler.running
    metrics = agent_metrics(sum(groups, []))
    assert metrics["rollout/aborted_samples"] == 2.0 and metrics["rollout/timeouts"] == 2.0


def test_the_step_timeout_ends_every_unfinished_sample(loaded):
    groups = manager(loaded, generate_function="agent_plugins:stuck", step_timeout_s=0.3).generate_all(PROMPTS)
    assert [s.metadata["abort_reason"] for g in groups for s in g] == ["step_timeout"] * 4


def test_slime_flag_names_the_generate_function():
    from miles_core.launch.slime_launch import parse_slime_flags

    launch = parse_slime_flags(["--custom-generate-function-path", "agent_plugins:one_turn"])
    assert launch.overrides() == ['rollout.generate_function="agent_plugins:one_turn"']
