"""The `tiny-agent` recipe end to end on CPU: `miles train` with the calculator tool, a multi-turn
run (an environment that always answers) trained true on-policy in invariant mode (the loop stops
at the first bit of train/engine mismatch), and `miles rollout --show` printing turns and masks."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.metrics import read_metrics

runner = CliRunner()
MULTI_TURN = ["--set", "rollout.environment=agent_plugins:countdown_env",
              "--set", f"sampling.stop_token_ids={list(range(0, 256, 3))}"]


@pytest.fixture(autouse=True)
def plugins_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_tiny_agent_trains_with_the_calculator_tool(tmp_path):
    result = runner.invoke(app, ["train", "--recipe", "tiny-agent", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "rollout/num_turns" in m]
    assert len(steps) == 2
    for metrics in steps:
        assert metrics["rollout/num_samples"] == 8.0 and metrics["rollout/aborted_samples"] == 0.0
        assert metrics["rollout/num_turns"] >= 1.0 and "train/grad_norm" in metrics
    assert (tmp_path / "run" / "checkpoints" / "step_000002").is_dir()


def test_multi_turn_training_is_true_on_policy(tmp_path):
    result = runner.invoke(app, ["train", "--recipe", "tiny-agent", "--output-dir", str(tmp_path / "run"), *MULTI_TURN,
                                 "--set", "alignment.mode=invariant", "--set", "alignment.true_on_policy=true"])
    assert result.exit_code == 0, result.output
    steps = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "rollout/num_turns" in m]
    for metrics in steps:
        assert metrics["rollout/num_turns"] == 3.0  # every sample: 3 model turns, 2 observations between
        assert metrics["train/train_rollout_logprob_bitwise_equal"] == 1.0
        assert metrics["train/train_rollout_logprob_max_abs_diff"] == 0.0


def test_rollout_shows_turns_tool_calls_and_masks(tmp_path):
    out = tmp_path / "samples.jsonl"
    result = runner.invoke(app, ["rollout", "--recipe", "tiny-agent", "-o", str(out), "--show", "1",
                                 "--set", "data.max_prompts=1", *MULTI_TURN])
    assert result.exit_code == 0, result.output
    assert "sample 0 (prompt 0): truncated, 3 turn(s), 0 tool call(s)" in result.output
    assert result.output.count("[assistant, ") == 3 and result.output.count("loss_mask 1") == 3
    assert result.output.count("[observation, ") == 2 and result.output.count("loss_mask 0") == 2
    assert "observation 2" in result.output
