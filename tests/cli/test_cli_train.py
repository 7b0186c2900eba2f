"""`miles train`: the run folder (config, metrics, HF checkpoints that `transformers` loads),
training that moves weights when rewards vary, the debug modes that split rollout from
training, and the flags that override the recipe."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.checkpoint.hf import load_state_dict
from miles_core.checkpoint.sources import resolve_model_source
from miles_core.config import ModelConfig, load_config
from miles_core.metrics import read_metrics
from miles_core.checkpoint.loading import load_model
from miles_core.sample import read_samples_jsonl

runner = CliRunner()

ROLLOUT_KEYS = {"rollout/raw_reward", "rollout/response_len"}
TRAIN_KEYS = {"train/pg_loss", "train/pg_clipfrac", "train/ppo_kl", "train/entropy_loss", "train/grad_norm",
              "train/train_rollout_logprob_abs_diff"}
PERF_KEYS = {"perf/step_time", "perf/rollout_tokens_per_s"}

LENGTH_REWARD = '''
def reward(sample):
    return len(sample.response) / 10
'''


def train(*args: str):
    return runner.invoke(app, ["train", "--recipe", "tiny", *args])


def initial_weights() -> dict[str, torch.Tensor]:
    return load_state_dict(resolve_model_source("tiny-qwen3"))


def step_records(path) -> list[dict]:
    """The records of rollout steps, without the final eval-only record."""
    return [r for r in read_metrics(path) if "rollout/num_samples" in r]


def eval_keys(record: dict) -> set[str]:
    return {key for key in record if key.startswith("eval/")}


def train_keys(records: list[dict]) -> set[str]:
    return {key for record in records for key in record if key.startswith("train/")}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    result = train("--output-dir", str(out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def rollout_only_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rollout_only") / "run"
    result = train("--output-dir", str(out), "--debug-rollout-only")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def train_only_run(tmp_path_factory, rollout_only_run):
    out = tmp_path_factory.mktemp("train_only") / "run"
    template = str(rollout_only_run / "rollouts" / "step_00000{rollout_id}.jsonl")
    result = train("--output-dir", str(out), "--debug-train-only", "--load-debug-rollout-data", template)
    assert result.exit_code == 0, result.output
    return out


# -- a full run ------------------------------------------------------------------------------------

def test_train_writes_the_resolved_config(full_run):
    assert load_config(str(full_run / "config.toml")) == load_config("tiny")


def test_train_writes_one_metrics_record_per_step(full_run):
    records = read_metrics(full_run / "metrics.jsonl")
    # One record per rollout step, then one for the eval of the final weights (tiny has an eval set).
    assert [r["step"] for r in records] == [0, 1, 2]
    assert eval_keys(records[0]) and not eval_keys(records[1])
    assert set(records[2]) == eval_keys(records[0]) | {"step", "perf/eval_time"}
    for record in records[:2]:
        assert ROLLOUT_KEYS | TRAIN_KEYS | PERF_KEYS <= set(record)
        assert record["rollout/num_samples"] == 8  # batch_size 4 x 2 samples
        assert record["perf/rollout_tokens_per_s"] > 0
        # Same weights generated and scored the tokens: only float noise between the two.
        assert record["train/train_rollout_logprob_abs_diff"] < 1e-4


def test_zero_rewards_leave_the_weights_unchanged(full_run):
    # The random tiny model never answers right: every group has zero advantage, so no gradient.
    records = step_records(full_run / "metrics.jsonl")
    assert all(r["rollout/raw_reward"] == 0 and r["train/grad_norm"] == 0 for r in records)
    trained = load_state_dict(full_run / "checkpoints" / "step_000002")
    initial = initial_weights()
    assert trained.keys() == initial.keys()
    assert all(torch.equal(trained[name], initial[name]) for name in initial)


def test_checkpoint_loads_in_transformers_with_the_native_logits(full_run):
    from transformers import AutoModelForCausalLM

    checkpoint = full_run / "checkpoints" / "step_000002"
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["latest", "step_000002"]
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    native = load_model(ModelConfig(source=str(checkpoint), device="cpu"))
    ids = torch.tensor([native.tokenizer("What is 2 + 3?")["input_ids"]])
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        hf_logits = hf_model(ids).logits
        native_logits = native.model.lm_head(native.model(ids, positions))
    torch.testing.assert_close(native_logits, hf_logits, rtol=1e-4, atol=1e-5)
    generated = hf_model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert generated.shape == (1, ids.shape[1] + 4)
    assert torch.equal(generated[:, : ids.shape[1]], ids)


def test_existing_run_folder_is_refused_and_left_alone(full_run):
    before = {p: p.read_bytes() for p in (full_run / "metrics.jsonl", full_run / "config.toml")}
    result = train("--output-dir", str(full_run), "--set", "sampling.temperature=0.5")
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: output dir '{full_run}' already holds a run (metrics.jsonl); "
                                     "choose another --output-dir")
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["latest", "step_000002"]


# -- training moves weights ------------------------------------------------------------------------

def test_varying_rewards_produce_gradients_and_new_weights(tmp_path, monkeypatch):
    (tmp_path / "miles_test_length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    result = train("--output-dir", str(out), "--num-rollout", "1",
                   "--set", "reward.type=miles_test_length_reward:reward")
    assert result.exit_code == 0, result.output
    [record] = step_records(out / "metrics.jsonl")
    assert record["rollout/zero_std_groups"] < 1  # the premise: some group has an advantage
    assert record["rollout/reward_failures"] == 0
    assert record["train/grad_norm"] > 0
    trained = load_state_dict(out / "checkpoints" / "step_000001")
    initial = initial_weights()
    changed = [name for name in initial if not torch.equal(trained[name], initial[name])]
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" in changed


# -- debug modes -----------------------------------------------------------------------------------

def test_rollout_only_saves_samples_and_never_trains(rollout_only_run):
    saved = sorted(p.name for p in (rollout_only_run / "rollouts").iterdir())
    assert saved == ["step_000000.jsonl", "step_000001.jsonl"]
    for name in saved:
        samples = list(read_samples_jsonl(rollout_only_run / "rollouts" / name))
        assert len(samples) == 8
        assert all(s.reward == 0 for s in samples)  # scored before saving
        assert all(s.metadata["rollout_id"] == int(name[5:11]) for s in samples)
    assert not (rollout_only_run / "checkpoints").exists()
    records = read_metrics(rollout_only_run / "metrics.jsonl")
    assert len(records) == 2
    assert train_keys(records) == set()
    assert eval_keys(records[0]) and not eval_keys(records[1])  # the weights never change: one eval
    assert all(ROLLOUT_KEYS | PERF_KEYS <= set(r) and "perf/train_time" not in r for r in records)


def test_train_only_trains_on_the_saved_samples(train_only_run, rollout_only_run):
    records = read_metrics(train_only_run / "metrics.jsonl")
    source = read_metrics(rollout_only_run / "metrics.jsonl")
    assert len(records) == 2
    assert not any(eval_keys(r) for r in records)  # no engine, no eval
    assert all(TRAIN_KEYS <= set(r) for r in records)
    for mine, theirs in zip(records, source):
        assert mine["rollout/response_len"] == theirs["rollout/response_len"]
        assert mine["rollout/raw_reward"] == theirs["rollout/raw_reward"]
    # Step 0 trains the weights that generated step 0's samples: the log-probs agree.
    assert records[0]["train/train_rollout_logprob_abs_diff"] < 1e-4
    assert not (train_only_run / "rollouts").exists()
    assert (train_only_run / "checkpoints" / "step_000002" / "model.safetensors").is_file()


def test_train_only_reports_no_generation_throughput(train_only_run):
    records = read_metrics(train_only_run / "metrics.jsonl")
    assert all("perf/rollout_tokens_per_s" not in r for r in records)


def test_train_only_accepts_a_format_spec_in_the_template(tmp_path, rollout_only_run):
    template = str(rollout_only_run / "rollouts" / "step_{rollout_id:06d}.jsonl")
    result = train("--output-dir", str(tmp_path / "run"), "--debug-train-only",
                   "--load-debug-rollout-data", template)
    assert result.exit_code == 0, result.output
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2
    assert "eval: skipped (--debug-train-only has no rollout engine)" in result.output


def test_train_only_without_rollout_data_is_refused(tmp_path):
    out = tmp_path / "run"
    result = train("--output-dir", str(out), "--debug-train-only")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stderr.strip().startswith("error: --debug-train-only needs --load-debug-rollout-data")
    assert not out.exists()


def test_debug_modes_exclude_each_other(tmp_path):
    out = tmp_path / "run"
    result = train("--output-dir", str(out), "--debug-rollout-only", "--debug-train-only")
    assert result.exit_code == 2
    assert "exclude each other" in result.stderr
    assert not out.exists()


def test_failed_run_does_not_block_its_output_dir(tmp_path, rollout_only_run):
    out = tmp_path / "run"
    missing = str(tmp_path / "nope.jsonl")
    first = train("--output-dir", str(out), "--debug-train-only", "--load-debug-rollout-data", missing)
    assert first.exit_code == 2 and "file not found" in first.stderr
    template = str(rollout_only_run / "rollouts" / "step_00000{rollout_id}.jsonl")
    second = train("--output-dir", str(out), "--debug-train-only", "--load-debug-rollout-data", template)
    assert second.exit_code == 0, second.output


# -- flags over the recipe ---------------------------------------------------------------------------

def test_num_rollout_and_hf_checkpoint_flags_override_the_recipe(tmp_path):
    model_dir = resolve_model_source("tiny-qwen3")
    out = tmp_path / "run"
    result = train("--output-dir", str(out), "--num-rollout", "1", "--hf-checkpoint", str(model_dir))
    assert result.exit_code == 0, result.output
    resolved = load_config(str(out / "config.toml"))
    assert resolved.loop.num_rollout == 1
    assert resolved.model.source == str(model_dir)
    assert len(step_records(out / "metrics.jsonl")) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001"]
    saved = json.loads((out / "checkpoints" / "step_000001" / "config.json").read_text())
    assert saved["model_type"] == "qwen3"


def test_hf_checkpoint_that_does_not_exist_is_refused(tmp_path):
    out = tmp_path / "run"
    result = train("--output-dir", str(out), "--hf-checkpoint", str(tmp_path / "missing"))
    assert result.exit_code == 2
    assert f"model source '{tmp_path / 'missing'}'" in result.stderr
