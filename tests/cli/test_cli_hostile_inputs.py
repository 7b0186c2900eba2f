"""Issue 22: what a hostile new user feeds `miles` gets one clear line and exit code 2 (or a
warning), never a traceback, a silent NaN, or a run folder that blocks the next attempt."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.checkpoint.hf import iter_state_dict, load_state_dict, save_hf_checkpoint
from miles_core.checkpoint.sources import resolve_model_source

runner = CliRunner()

REWARDS = '''
import time

def vast(sample):
    return 1e300 * (sample.index % 2)

def huge(sample):
    return 3e38 * (sample.index % 2)

def broken(sample):
    raise RuntimeError("judge unreachable")

def half_broken(sample):
    if sample.index % 2:
        raise RuntimeError("judge unreachable")
    return 1.0

def nan_one(sample):
    return float("nan") if sample.index == 1 else 1.0

def hangs(sample):
    time.sleep(5)
    return 1.0
'''


def train(tmp_path, *args: str, recipe: str = "tiny"):
    return runner.invoke(app, ["train", "--recipe", recipe, "--output-dir", str(tmp_path / "run"), *args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def rewards(tmp_path, monkeypatch):
    (tmp_path / "miles_test_rewards22.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "miles_test_rewards22"


# -- 2. non-finite values ------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["train.lr=inf", "train.weight_decay=inf", "train.weight_decay=nan",
                                      "train.adam_eps=nan", "train.adam_beta1=nan", "algo.eps_clip=inf",
                                      "sampling.temperature=-inf"])
def test_non_finite_hyper_parameters_are_refused(tmp_path, override):
    key, value = override.split("=")
    line = one_error_line(train(tmp_path, "--set", override))
    assert f"'{key}' must be a finite number, got {value}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [("train.adam_beta1=1.5", "adam_beta1 must be in [0, 1), got 1.5"),
                                               ("train.adam_eps=0", "adam_eps must be > 0, got 0.0"),
                                               ("train.weight_decay=-1", "weight_decay must be >= 0, got -1.0")])
def test_adamw_settings_have_ranges(tmp_path, override, message):
    assert message in one_error_line(train(tmp_path, "--set", override))


def test_huge_rewards_give_finite_advantages_in_float64(tmp_path, rewards):
    # 1e300 is inf in float32; in float64 the group (0, 1e300) has advantages -+0.707.
    result = train(tmp_path, "--set", f"reward.type={rewards}:vast", "--num-rollout", "1")
    assert result.exit_code == 0, result.output
    trained = load_state_dict(tmp_path / "run" / "checkpoints" / "step_000001")
    start = load_state_dict(resolve_model_source("tiny-qwen3"))
    assert all(torch.isfinite(t).all() for t in trained.values())
    assert any(not torch.equal(trained[n], start[n]) for n in start)


def test_advantages_that_overflow_float32_stop_the_run(tmp_path, rewards):
    # dr_grpo does not divide by the std: 1e300 - 5e299 cannot be a float32 advantage.
    line = one_error_line(train(tmp_path, "--set", f"reward.type={rewards}:vast",
                                "--set", "algo.advantage_estimator=dr_grpo"))
    assert "advantages overflow float32 (largest |value| 5e+299" in line


def test_a_nan_gradient_skips_the_steps_then_stops_after_max_bad_steps(tmp_path, rewards):
    # 3e38 / 2 is a finite float32 advantage, but the backward overflows: the gradient norm is NaN.
    # Each step is skipped (weights untouched, logged); the third in a row stops the run (issue 21).
    result = train(tmp_path, "--set", f"reward.type={rewards}:huge", "--set", "algo.advantage_estimator=dr_grpo",
                   "--num-rollout", "3")
    line = one_error_line(result)
    assert "3 optimizer steps in a row had a non-finite loss or gradient norm (train.max_bad_steps = 3)" in line
    output = " ".join(result.output.split())
    assert "warning: step 0: optimizer step skipped, non-finite loss" in output and "grad norm nan" in output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_nan_reward_is_a_counted_failure_and_never_reaches_the_update(tmp_path, rewards):
    result = train(tmp_path, "--set", f"reward.type={rewards}:nan_one", "--num-rollout", "1")
    assert result.exit_code == 0, result.output
    assert "first: sample 1: reward must be finite, got nan" in " ".join(result.output.split())
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["rollout/reward_failures"] == 1.0 and record["train/skipped_step"] == 0.0
    assert math.isfinite(record["train/grad_norm"])


def test_a_nan_starting_checkpoint_is_refused_with_the_tensor_name(tmp_path):
    source = resolve_model_source("tiny-qwen3")
    tensors = dict(iter_state_dict(source))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].clone()
    tensors["model.norm.weight"][3] = math.nan
    save_hf_checkpoint(tmp_path / "bad", tensors.items(), json.loads((source / "config.json").read_text()),
                       source_dir=source)
    line = one_error_line(train(tmp_path, "--hf-checkpoint", str(tmp_path / "bad")))
    assert "holds NaN/Inf in 'model.norm.weight'" in line


# -- 4. a failed start leaves no folder that blocks the next attempt -------------------------------
def test_a_failed_start_leaves_no_run_folder_and_the_retry_runs(tmp_path):
    line = one_error_line(train(tmp_path, "--hf-checkpoint", str(tmp_path / "missing-model")))
    assert "missing-model" in line
    assert not (tmp_path / "run").exists()
    result = train(tmp_path, "--num-rollout", "1")
    assert result.exit_code == 0, result.output


def test_a_folder_with_config_but_no_metrics_is_reused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("# left by a crashed start\n")
    result = train(tmp_path, "--num-rollout", "1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size > 0
    assert "[model]" in (tmp_path / "run" / "config.toml").read_text()
    assert "already holds a run" in one_error_line(train(tmp_path, "--num-rollout", "1"))


# -- 5. rewards that fail -----------------------------------------------------------------------------
def test_a_reward_that_always_fails_stops_the_run_and_says_why(tmp_path, rewards):
    line = one_error_line(train(tmp_path, "--set", f"reward.type={rewards}:broken"))
    assert "8 of 8 reward calls failed" in line
    assert "first: sample 0: RuntimeError: judge unreachable" in line
    assert "reward.max_failure_fraction = 0.5" in line


def test_some_failing_rewards_are_logged_once_per_batch(tmp_path, rewards):
    result = train(tmp_path, "--set", f"reward.type={rewards}:half_broken", "--num-rollout", "1")
    assert result.exit_code == 0, result.output
    assert "4 of 8 reward calls failed" in result.output
    assert "first: sample 1: RuntimeError: judge unreachable" in result.output


def test_a_hanging_reward_times_out(tmp_path, rewards):
    line = one_error_line(train(tmp_path, "--set", f"reward.type={rewards}:hangs", "--set", "reward.timeout=0.1"))
    assert "first: sample 0: timed out after 0.1 s (reward.timeout)" in line


# -- 3. a prompt over the context is found before the first step -----------------------------------
def prompt_file(tmp_path, long_at: int = 5, num: int = 8):
    lines = [json.dumps({"prompt": "x" * 200 if i == long_at else f"{i} + 1 =", "label": str(i + 1)})
             for i in range(num)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_long_prompt_late_in_the_file_fails_before_training(tmp_path):
    path = prompt_file(tmp_path)
    line = one_error_line(train(tmp_path, "--set", "data.task=''", "--set", f"data.path='{path}'",
                                "--set", "engine.max_context_len=64", "--set", "eval.datasets=[]"))
    assert f"{path}:6: prompt 'xxxx" in line
    assert "has 2" in line and "tokens; the limit is 63 (context 64" in line
    assert "1 of 8 prompts are too long" in line and 'data.on_long_prompt = "skip"' in line
    assert not (tmp_path / "run").exists()


def test_long_prompts_can_be_skipped_with_a_count(tmp_path):
    path = prompt_file(tmp_path)
    result = train(tmp_path, "--set", "data.task=''", "--set", f"data.path='{path}'", "--num-rollout", "1",
                   "--set", "engine.max_context_len=64", "--set", "data.on_long_prompt=skip",
                   "--set", "eval.datasets=[]")
    assert result.exit_code == 0, result.output
    assert 'skipped 1 of 8 prompts longer than 63 tokens (data.on_long_prompt = "skip")' in result.output


def test_miles_rollout_checks_prompt_lengths_first(tmp_path):
    path = prompt_file(tmp_path, long_at=0)
    line = one_error_line(runner.invoke(app, ["rollout", "--recipe", "tiny", "--prompt-data", str(path),
                                              "--output", str(tmp_path / "out.jsonl"),
                                              "--set", "engine.max_context_len=64"]))
    assert f"{path}:1: prompt 'xxxx" in line
    assert not (tmp_path / "out.jsonl").exists()


def test_a_long_eval_prompt_fails_before_the_first_step(tmp_path):
    recipe = tmp_path / "long-eval.toml"
    recipe.write_text(f"""extends = "tiny"
[[eval.datasets]]
name = "heldout"
[eval.datasets.data]
prompt_template = "{{prompt}} {'y' * 100}"
[eval.datasets.data.arithmetic]
split = "test"
num_prompts = 4
""")
    line = one_error_line(train(tmp_path, "--set", "engine.max_context_len=64", recipe=str(recipe)))
    assert line.startswith("error: eval dataset 'heldout': task 'arithmetic' record 0: prompt ")
    assert "the limit is 63 (context 64" in line


# -- 6. upper bounds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("rollout.batch_size=100000000", "rollout: batch_size must be in [1, 1048576], got 100000000"),
    ("sampling.n_samples_per_prompt=100000000", "n_samples_per_prompt must be in [1, 1048576], got 100000000"),
    ("engine.max_batch_size=100000000", "max_batch_size must be in [1, 1048576], got 100000000"),
])
def test_batch_sizes_have_an_upper_bound(tmp_path, override, message):
    assert message in one_error_line(train(tmp_path, "--set", override))


def test_a_rollout_batch_larger_than_the_dataset_is_refused(tmp_path):
    line = one_error_line(train(tmp_path, "--set", "rollout.batch_size=17"))
    assert line == ("error: rollout.batch_size = 17 is more than the 16 prompts of task 'arithmetic'; a step would "
                    "repeat prompts: set it to at most 16 or add prompts")
    assert not (tmp_path / "run").exists()


# -- 7. misleading messages ---------------------------------------------------------------------------
def test_a_training_data_path_does_not_become_the_heldout_set(tmp_path):
    from miles_core.config.tree import tomllib

    path = prompt_file(tmp_path)  # 8 prompts; the recipe's heldout set is 4 arithmetic test problems
    result = train(tmp_path, "--set", "data.task=''", "--set", f"data.path='{path}'", "--num-rollout", "1",
                   "--set", "engine.max_context_len=64", "--set", "data.on_long_prompt=skip")
    assert result.exit_code == 0, result.output
    heldout = tomllib.loads((tmp_path / "run" / "config.toml").read_text())["eval"]["datasets"][0]["data"]
    assert (heldout["path"], heldout["task"], heldout["arithmetic"]["split"]) == ("", "arithmetic", "test")


def test_a_missing_tokenizer_is_named(tmp_path):
    source = resolve_model_source("tiny-qwen3")
    (tmp_path / "model").mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / "model" / name).write_bytes((source / name).read_bytes())
    line = one_error_line(train(tmp_path, "--hf-checkpoint", str(tmp_path / "model"),
                                "--set", "data.apply_chat_template=false"))
    assert line.startswith(f"error: no tokenizer in '{tmp_path / 'model'}': expected one of tokenizer.json")


def test_the_no_eval_datasets_message_points_at_the_readme(tmp_path):
    line = one_error_line(runner.invoke(app, ["rollout", "--recipe", "tiny", "--eval", "--set", "eval.datasets=[]"]))
    assert "docs/eval.md" not in line and "README.md, section Evaluation" in line


def test_miles_rollout_eval_checks_eval_prompt_lengths_first(tmp_path):
    line = one_error_line(runner.invoke(app, ["rollout", "--recipe", "tiny", "--eval",
                                              "--set", "engine.max_context_len=20"]))
    assert line.startswith("error: eval dataset 'heldout': task 'arithmetic' record 0: prompt ")
    assert "the limit is 19 (context 20" in line
