"""Evaluation end to end on the tiny recipe: inside `miles train` (records, summary, no effect on
training) and offline with `miles rollout --eval` (repeatable, side by side, same numbers as the
in-training eval of the same weights), and bad inputs refused with one line and exit code 2."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.metrics import read_metrics

runner = CliRunner()

PARITY_REWARD = "def reward(sample):\n    return float(sum(sample.response_tokens) % 2)\n"
REWARD = "reward.type=miles_test_parity_reward:reward"  # varies on the random model: GRPO moves weights
EVAL_KEYS = {f"eval/heldout/{m}" for m in ("reward", "accuracy", "pass@1", "pass@2", "mean@2", "response_len",
                                            "truncated", "reward_failures")}


@pytest.fixture(scope="module", autouse=True)
def parity_reward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reward")
    (folder / "miles_test_parity_reward.py").write_text(PARITY_REWARD)
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))
    sys.modules.pop("miles_test_parity_reward", None)


def train(out, *sets: str):
    args = [a for s in (REWARD, *sets) for a in ("--set", s)]
    return runner.invoke(app, ["train", "--recipe", "tiny", "--output-dir", str(out), *args])


def offline_eval(*args: str):
    return runner.invoke(app, ["rollout", "--eval", "--recipe", "tiny", "--set", REWARD, *args])


def offline_json(*args: str) -> list[dict]:
    result = offline_eval(*args, "--json")
    assert result.exit_code == 0, result.output
    return [c["metrics"] for c in json.loads(result.stdout)["checkpoints"]]


def eval_part(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith("eval/")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    result = train(out, "eval.eval_interval=1")
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture(scope="module")
def final_checkpoint(trained):
    return str(trained[0] / "checkpoints" / "step_000002")


# -- inside training ---------------------------------------------------------------------------------

def test_eval_is_logged_before_each_step_and_after_the_last(trained):
    records = read_metrics(trained[0] / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in records[:2]:  # eval of the weights that generate this step, then the step itself
        assert EVAL_KEYS | {"perf/eval_time", "rollout/raw_reward", "train/pg_loss"} <= set(record)
    assert set(records[2]) == EVAL_KEYS | {"step", "perf/eval_time"}  # the final weights: eval only
    assert all(0 <= records[2][k] <= 1 for k in EVAL_KEYS - {"eval/heldout/response_len",
                                                             "eval/heldout/reward_failures"})


def test_train_summary_shows_the_eval_before_and_after(trained):
    output = trained[1].output
    assert "eval: heldout" in output
    header = next(line for line in output.splitlines() if "metric" in line)
    assert "step 0" in header and "step 2" in header and "step 1" not in header
    assert any(line.split("│")[1].strip() == "pass@2" for line in output.splitlines() if line.count("│") == 5)


def test_eval_leaves_training_unchanged(trained, tmp_path):
    out = tmp_path / "run"
    assert train(out, "eval.datasets=[]").exit_code == 0
    plain = read_metrics(out / "metrics.jsonl")
    with_eval = read_metrics(trained[0] / "metrics.jsonl")[:2]
    assert all(not eval_part(r) for r in plain)

    def training_part(record):
        return {k: v for k, v in record.items() if not k.startswith(("eval/", "perf/"))}

    assert [training_part(r) for r in plain] == [training_part(r) for r in with_eval]
    final = "checkpoints/step_000002/model.safetensors"
    assert (out / final).read_bytes() == (trained[0] / final).read_bytes()


def test_bad_eval_data_stops_training_before_it_starts(tmp_path):
    out, missing = tmp_path / "run", tmp_path / "nope.jsonl"
    result = train(out, f'eval.datasets=[{{name = "file", data = {{path = "{missing}"}}}}]')
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: eval dataset 'file': file not found: '{missing}'"
    assert not out.exists()


# -- offline ------------------------------------------------------------------------------------------

def test_offline_eval_repeats_exactly_and_matches_the_training_evals(trained, final_checkpoint):
    records = read_metrics(trained[0] / "metrics.jsonl")
    base, final = offline_json("--checkpoint", "tiny-qwen3", "--compare", final_checkpoint)
    [again] = offline_json("--checkpoint", final_checkpoint)
    assert again == final  # same checkpoint, same seeds: identical numbers
    # The engine evaluated the same weights with the same seeds during training.
    assert base == eval_part(records[0])
    assert final == eval_part(records[2])
    assert base != final  # training moved the weights enough to change the held-out answers


def test_compare_of_one_checkpoint_with_itself_gives_identical_columns(final_checkpoint):
    result = offline_eval("--checkpoint", final_checkpoint, "--compare", final_checkpoint)
    assert result.exit_code == 0, result.output
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in result.output.splitlines() if line.count("│") == 5]
    assert {row[0] for row in rows} == {key.split("/")[-1] for key in EVAL_KEYS}
    for metric, first, second, change in rows:
        assert first == second and change == "+0.000", metric


def test_eval_without_checkpoint_uses_the_recipe_model():
    [metrics] = offline_json()
    assert set(metrics) == EVAL_KEYS


# -- bad inputs -------------------------------------------------------------------------------------------

def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_eval_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert_refused(offline_eval("--set", f'eval.datasets=[{{name = "f", data = {{path = "{missing}"}}}}]'),
                   f"eval dataset 'f': file not found: '{missing}'")


def test_eval_file_without_the_input_key(tmp_path):
    data = tmp_path / "held.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 1?", "label": "2"}) + "\n")
    assert_refused(offline_eval("--set", f'eval.datasets=[{{name = "f", data = {{path = "{data}"}}}}]'),
                   "eval dataset 'f'", f"{data}:1: missing key 'prompt'")


def test_recipe_without_eval_datasets():
    assert_refused(offline_eval("--set", "eval.datasets=[]"), "no eval datasets", "eval.datasets")


def test_unknown_checkpoint(tmp_path):
    assert_refused(offline_eval("--checkpoint", str(tmp_path / "missing")), f"model source '{tmp_path / 'missing'}'")


@pytest.mark.parametrize("args, fragment", [
    (["--json"], "--checkpoint, --compare and --json need --eval"),
    (["--compare", "tiny-qwen3"], "need --eval"),
    ([], "--output is required"),
])
def test_eval_options_without_eval(args, fragment):
    assert_refused(runner.invoke(app, ["rollout", "--recipe", "tiny", *args]), fragment)


def test_eval_writes_no_samples(tmp_path):
    assert_refused(offline_eval("-o", str(tmp_path / "x.jsonl")), "writes no samples")
    assert not (tmp_path / "x.jsonl").exists()
