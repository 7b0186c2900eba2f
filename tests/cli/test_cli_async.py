"""`miles train` in async mode end to end: `--set loop.mode=async`, its `--async` alias and
slime's `--fully-async` / `--partial-rollout` flags; a run without off-policy correction is
refused with the keys to set and writes nothing."""

from __future__ import annotations

import shlex

from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.config import load_config
from miles_core.metrics import read_metrics
from miles_core.sample import read_samples_jsonl

runner = CliRunner()


def test_async_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--set", "loop.mode=async", "--set", "algo.use_tis=true",
                                 "--set", "loop.save_rollout_data=true", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1, 2]  # tiny: 2 steps, then the final eval
    # Lag 1: step 0 by version 0 (trained from 0), step 1 also by version 0 (trained from 1).
    assert [r["rollout/staleness_max"] for r in records[:2]] == [0.0, 1.0]
    assert [r["eval/weight_version"] for r in (records[0], records[2])] == [0.0, 2.0]
    assert {v for s in read_samples_jsonl(out / "rollouts" / "step_000001.jsonl") for v in s.weight_versions} == {"0"}
    assert (out / "checkpoints" / "step_000002" / "state.json").is_file()


def test_async_alias_and_refusal(tmp_path):
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--async", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "loop.mode = 'async' trains on tokens sampled by older weights: set algo.use_tis = true" in result.output
    assert not (tmp_path / "run").exists()
    out = tmp_path / "saved.toml"
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--async", "--set", "algo.use_tis=true",
                                 "--save-recipe", str(out)])
    assert result.exit_code == 0, result.output
    assert load_config(str(out)).loop.mode == "async"


def test_slime_async_flags(tmp_path):
    out = tmp_path / "from_slime.toml"
    line = ("--recipe tiny --fully-async --use-tis --partial-rollout --mask-offpolicy-in-partial-rollout "
            "--over-sampling-batch-size 6 --max-weight-staleness 2")
    result = runner.invoke(app, ["train", *shlex.split(line), "--save-recipe", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load_config(str(out))
    assert (cfg.loop.mode, cfg.loop.max_staleness, cfg.rollout.partial, cfg.rollout.mask_offpolicy_prefix,
            cfg.algo.over_sampling_batch_size, cfg.algo.use_tis) == ("async", 2, True, True, 6, True)
    assert cfg.rollout_lag == 2
