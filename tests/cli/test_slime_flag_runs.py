"""slime flags that change what a run does, run end to end on the tiny recipe:
`--save-debug-rollout-data` then `--debug-train-only --load-debug-rollout-data` reproduce the
training metrics; `--ref-load` builds the reference model from another checkpoint."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.checkpoint.hf import load_state_dict, read_hf_config, save_hf_checkpoint
from miles_core.checkpoint.loading import load_model
from miles_core.checkpoint.sources import resolve_model_source
from miles_core.config import ModelConfig
from miles_core.metrics import read_metrics
from miles_core.sample import read_samples_jsonl
from miles_core.train.batch import TrainBatch, response_log_probs

runner = CliRunner()


def train(*args: str):
    result = runner.invoke(app, ["train", "--recipe", "tiny", *args])
    assert result.exit_code == 0, result.output
    return result


def train_records(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith("train/")} for r in read_metrics(run / "metrics.jsonl")
            if "rollout/num_samples" in r]


def test_saved_rollout_data_trains_to_the_same_metrics(tmp_path):
    template = str(tmp_path / "debug" / "rollout_{rollout_id}.jsonl")
    full = tmp_path / "full"
    train("--save", str(full), "--save-debug-rollout-data", template)
    saved = [tmp_path / "debug" / f"rollout_{step}.jsonl" for step in (0, 1)]
    assert all(path.is_file() for path in saved)
    assert not (full / "rollouts").exists()  # the template replaces <run>/rollouts/
    assert len(list(read_samples_jsonl(saved[0]))) == 8  # tiny: 4 prompts x 2 samples

    replay = tmp_path / "replay"
    train("--save", str(replay), "--debug-train-only", "--load-debug-rollout-data", template)
    want, got = train_records(full), train_records(replay)
    assert len(want) == 2 and want[0]
    for w, g in zip(want, got):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), key


# -- --ref-load --------------------------------------------------------------------------------------

KL = ("--use-kl-loss", "--kl-loss-coef", "0.1", "--num-rollout", "1")


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """tiny-qwen3 with every weight scaled by 0.9: the same tokenizer, other log-probs."""
    source = resolve_model_source("tiny-qwen3")
    out = tmp_path_factory.mktemp("ref") / "tiny-scaled"
    tensors = [(name, tensor * 0.9) for name, tensor in load_state_dict(source).items()]
    save_hf_checkpoint(out, tensors, read_hf_config(source), source_dir=source)
    return str(out)


def kl_at_step_0(run) -> float:
    return train_records(run)[0]["train/kl_loss"]


def test_ref_load_builds_the_reference_from_another_checkpoint(tmp_path, other_checkpoint):
    data = str(tmp_path / "rollout_{rollout_id}.jsonl")
    train("--save", str(tmp_path / "default"), *KL)
    train("--save", str(tmp_path / "same"), *KL, "--ref-load", str(resolve_model_source("tiny-qwen3")))
    train("--save", str(tmp_path / "other"), *KL, "--ref-load", other_checkpoint, "--save-debug-rollout-data", data)
    # reference = starting policy, by copy or loaded from the same checkpoint: KL 0 before any update
    assert kl_at_step_0(tmp_path / "default") == 0.0 and kl_at_step_0(tmp_path / "same") == 0.0
    # another reference: the k1 KL (slime's default) of the step's samples, per-sample token mean
    # then mean over samples (slime's seq_mean_token_mean), computed here from the two checkpoints
    samples = list(read_samples_jsonl(tmp_path / "rollout_0.jsonl"))
    batch = TrainBatch.from_samples(samples)
    policy = load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model
    reference = load_model(ModelConfig(source=other_checkpoint, device="cpu")).model
    with torch.no_grad():
        logp, _ = response_log_probs(policy, batch.tokens, batch.response_lengths, temperature=1.0, chunk_size=64)
        ref, _ = response_log_probs(reference, batch.tokens, batch.response_lengths, temperature=1.0, chunk_size=64)
    per_sample = [((lp - rp) * m).sum() / m.sum() for lp, rp, m in zip(logp, ref, batch.loss_masks)]
    want = float(sum(per_sample) / len(per_sample))
    assert want != 0.0
    assert kl_at_step_0(tmp_path / "other") == pytest.approx(want, rel=1e-4, abs=1e-6)

