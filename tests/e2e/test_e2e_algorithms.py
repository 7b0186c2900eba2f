"""`miles train` end to end with each algorithm family's recipe (tiny-dapo, tiny-gspo, tiny-ppo):
the run succeeds, logs the family's metrics, and moves the weights when rewards vary; a bad hook
path fails at start-up."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.checkpoint.hf import load_state_dict
from miles_core.checkpoint.sources import resolve_model_source
from miles_core.metrics import read_metrics
from miles_core.sample import read_samples_jsonl

runner = CliRunner()

# Rewards that vary inside a group (the random tiny model never answers right, so the built-in
# reward is always 0 and no group would carry a learning signal).
REWARDS = '''
def length(sample):
    return len(sample.response) / 10

def length_on_odd_labels(sample):
    """Groups of prompts with an even answer all score 0: dynamic sampling drops them."""
    return len(sample.response) / 10 if int(sample.label) % 2 else 0.0

def zero(sample):
    return 0.0
'''


@pytest.fixture(scope="module")
def rewards_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "miles_e2e_rewards.py").write_text(REWARDS)
    patch = pytest.MonkeyPatch()
    patch.syspath_prepend(str(folder))
    yield "miles_e2e_rewards"
    patch.undo()


def train(out, recipe: str, *sets: str, num_rollout: int = 2):
    args = ["train", "--recipe", recipe, "--output-dir", str(out), "--num-rollout", str(num_rollout),
            "--set", "eval.datasets=[]"]
    for item in sets:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return read_metrics(out / "metrics.jsonl")


def changed_weights(out, num_rollout: int) -> list[str]:
    initial = load_state_dict(resolve_model_source("tiny-qwen3"))
    trained = load_state_dict(out / "checkpoints" / f"step_{num_rollout:06d}")
    assert trained.keys() == initial.keys()  # the policy only: no critic or value head in the checkpoint
    return [name for name in initial if not torch.equal(trained[name], initial[name])]


def test_dapo_trains_on_kept_groups_only(tmp_path, rewards_module):
    out = tmp_path / "run"
    records = train(out, "tiny-dapo", f"reward.type={rewards_module}:length_on_odd_labels",
                    "loop.save_rollout_data=true")
    for record in records:
        assert record["rollout/dynamic_sampling_generated_groups"] == 6 * record["rollout/dynamic_sampling_rounds"]
        assert record["rollout/dynamic_sampling_dropped_groups"] > 0  # the even-answer prompts
        assert record["rollout/dynamic_sampling_trained_groups"] == 4  # rollout.batch_size
        assert record["rollout/dynamic_sampling_skipped_step"] == 0
        assert record["rollout/shaped_reward"] < record["rollout/raw_reward"]  # the overlong penalty
        assert record["train/grad_norm"] > 0 and "train/pg_clipfrac" in record
    for step in range(2):  # what trained: 4 groups of 4, each with differing rewards, odd answers only
        samples = list(read_samples_jsonl(out / "rollouts" / f"step_{step:06d}.jsonl"))
        assert len(samples) == 16 and [s.group_index for s in samples] == [i // 4 for i in range(16)]
        for g in range(4):
            group = samples[4 * g: 4 * g + 4]
            assert int(group[0].label) % 2 == 1 and len({s.reward for s in group}) > 1
    assert "lm_head.weight" in changed_weights(out, 2)


def test_dapo_skips_a_step_when_no_group_is_kept(tmp_path, rewards_module):
    out = tmp_path / "run"
    [record] = train(out, "tiny-dapo", f"reward.type={rewards_module}:zero", num_rollout=1)
    assert record["rollout/dynamic_sampling_rounds"] == 3  # max_dynamic_sampling_rounds
    assert record["rollout/dynamic_sampling_drop_ratio"] == 1.0
    assert record["rollout/dynamic_sampling_shortfall_groups"] == 4
    assert record["rollout/dynamic_sampling_skipped_step"] == 1.0
    assert not any(key.startswith("train/") for key in record) and "perf/train_time" not in record
    assert changed_weights(out, 1) == []


def test_gspo_clips_sequence_ratios_on_the_second_optimizer_step(tmp_path, rewards_module):
    out = tmp_path / "run"
    [record] = train(tmp_path / "run", "tiny-gspo", f"reward.type={rewards_module}:length", num_rollout=1)
    assert record["train/grad_norm"] > 0
    # Step 2 of the rollout sees a policy moved by step 1; with eps 3e-4 its sequence ratios clip.
    assert record["train/ppo_kl"] != 0 and record["train/pg_clipfrac"] > 0
    assert "lm_head.weight" in changed_weights(out, 1)


def test_ppo_trains_a_critic_and_shapes_rewards_with_kl(tmp_path, rewards_module):
    out = tmp_path / "run"
    first, second = train(out, "tiny-ppo", f"reward.type={rewards_module}:length")
    for record in (first, second):
        assert record["train/value_loss"] > 0 and record["train/value_grad_norm"] > 0
        assert {"train/value_clipfrac", "rollout/returns", "rollout/advantages", "rollout/ref_kl"} <= set(record)
        assert record["rollout/advantages"] == pytest.approx(0, abs=1e-5)  # normalize_advantages
    assert first["rollout/values"] == 0 and first["rollout/ref_kl"] == 0  # zero head; policy == reference
    assert second["rollout/values"] != 0 and second["rollout/ref_kl"] > 0  # both moved after one update
    assert "lm_head.weight" in changed_weights(out, 2)


def test_bad_hook_path_fails_at_start_up_with_one_line(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--output-dir", str(out),
                                 "--set", "algo.custom_advantage_function=miles_e2e_no_such_module:advantage"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: advantage hook (algo.custom_advantage_function) "
                                                   "'miles_e2e_no_such_module:advantage': cannot import module")
    assert not out.exists()  # failed before the run folder or any model


def test_reference_refresh_follows_ref_update_interval(tmp_path, rewards_module):
    # Refreshed after every step, the reference equals the weights that generate the next rollout.
    first, second = train(tmp_path / "run", "tiny-ppo", f"reward.type={rewards_module}:length",
                          "algo.ref_update_interval=1")
    assert first["rollout/ref_kl"] == 0 and second["rollout/ref_kl"] == 0
    assert second["train/grad_norm"] > 0
