"""`miles align-check` end to end: tables and JSON, exact zero in invariant mode, thresholds
setting the exit code, MoE routing agreement, the per-layer diff, and bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from miles_cli.app import app


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("MILES_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


def run(*args: str):
    return CliRunner().invoke(app, ["align-check", "--recipe", "tiny", "--num-prompts", "6", *args])


def test_invariant_mode_reports_exact_zero_and_passes_zero_thresholds():
    result = run("--batch-sizes", "1,4,12", "--json", "--max-kl", "0", "--max-abs-diff", "0",
                 "--set", "alignment.mode=invariant")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "invariant" and [r["batch_size"] for r in report["results"]] == [1, 4, 12]
    for row in report["results"]:
        assert row["num_samples"] == 12 and row["stats"]["num_tokens"] == 96
        assert row["stats"]["kl_k1"] == 0.0 and row["stats"]["kl_k3"] == 0.0
        assert row["stats"]["max_abs_diff"] == 0.0 and row["stats"]["bitwise_equal"] == 1.0
        assert row["routing_agreement"] is None  # dense model


def test_fast_mode_mismatch_fails_a_zero_threshold_with_exit_code_1():
    result = run("--batch-sizes", "1,12", "--max-abs-diff", "0")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "max |delta|" in result.output
    assert "bitwise =" in result.output and "by response position" in result.output


def test_layers_table_and_the_shared_logits_comparator():
    result = run("--batch-sizes", "6", "--layers", "2", "--json")
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert [row["module"] for row in layers] == ["embed_tokens", "layers.0", "layers.1", "norm", "logits"]
    assert layers[0]["bitwise_equal"] == 1.0  # the embedding lookup is exact on both paths
    assert 0.0 <= layers[-1]["kl"] < 1e-9 and layers[-1]["top1_agree"] == 1.0


def test_moe_recipe_reports_routing_agreement():
    result = CliRunner().invoke(app, ["align-check", "--recipe", "tiny-moe", "--num-prompts", "4",
                                      "--batch-sizes", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["routing_agreement"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "1,x"], "--batch-sizes '1,x' must be comma-separated integers"),
    (["--batch-sizes", "0"], "--batch-sizes '0' must list integers >= 1"),
    (["--engine", "vllm"], "unknown engine 'vllm'"),
    (["--trainer", "deepspeed"], "unknown trainer 'deepspeed'"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.fixture
def nan_trainer(monkeypatch):
    """The trainer's log-probs of the first sequence are all NaN (a model with NaN weights)."""
    from miles_core.train.native import NativeTrainer

    real = NativeTrainer.compute_log_probs

    def nan_first(self, batch, **kwargs):
        out = real(self, batch, **kwargs)
        return [lp.clone().fill_(float("nan")) if i == 0 else lp for i, lp in enumerate(out)]

    monkeypatch.setattr(NativeTrainer, "compute_log_probs", nan_first)


def test_nan_log_probs_fail_every_finite_gate(nan_trainer):
    result = run("--batch-sizes", "4", "--max-kl", "1e-3", "--max-abs-diff", "1e-3")
    assert result.exit_code == 1, result.output
    assert "FAIL: KL nan (limit 0.001), max |delta| nan (limit 0.001)" in result.output
    result = run("--batch-sizes", "4", "--json", "--max-abs-diff", "1e-3")
    assert result.exit_code == 1
    assert json.loads(result.stdout.split("\nFAIL")[0])["results"][0]["stats"]["max_abs_diff"] != 0.0  # NaN != 0.0; it was reported as 0


@pytest.mark.parametrize("flag, value", [("--max-kl", "nan"), ("--max-abs-diff", "-1"), ("--max-kl", "-inf")])
def test_bad_threshold_is_one_line_and_exit_code_2(flag, value):
    result = run(flag, value)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith(f"error: {flag} must be a number >= 0 (inf disables the check), got ")


def test_batch_size_larger_than_the_sequences_is_reported_as_run():
    # 6 prompts x 2 samples = 12 sequences: 100000000 and 64 both run as 12, once.
    result = run("--batch-sizes", "4,100000000,64", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["batch_size"] for r in report["results"]] == [4, 12]
    assert "batch size 100000000 ran as 12: there are only 12 sequences (prompts x n_samples_per_prompt)" in report["notes"]


def test_tables_never_cut_numbers_at_80_columns():
    result = run("--batch-sizes", "100000000")  # CliRunner output is 80 columns wide
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    cells = "".join(line.replace("│", "").replace(" ", "") for line in result.output.splitlines())
    assert "e-0" in cells  # exponents are shown (folded onto a second line at this width)
