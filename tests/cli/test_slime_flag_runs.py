"""slime flags that change what a run does, run end to end on the tiny recipe:
`--save-debug-rollout-data` then `--debug-train-only --load-debug-rollout-data` reproduce the
training metrics; `--ref-load` builds the reference model from another checkpoint."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.metrics import read_metrics
from miles_core.sample import read_samples_jsonl

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
