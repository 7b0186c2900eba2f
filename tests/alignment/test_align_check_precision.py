"""`miles align-check --precision`: the INT4-QAT trainer against an INT4 engine is exactly on
policy in invariant mode; a plain trainer or an FP8 engine shows a gap; bad names are one line."""

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


def rows(precision: str) -> list[dict]:
    # tiny-moe-int4-qat: invariant kernels, fp32 on both sides, INT4 groups of 32 on the experts.
    result = CliRunner().invoke(app, ["align-check", "--recipe", "tiny-moe-int4-qat", "--num-prompts", "4",
                                      "--batch-sizes", "1,8", "--json", "--precision", precision])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["precision"] == precision
    return [r["stats"] for r in report["results"]]


def test_int4_qat_trainer_vs_int4_engine_is_exactly_zero():
    for stats in rows("int4-qat"):
        assert stats["kl_k1"] == 0.0 and stats["kl_k3"] == 0.0 and stats["max_abs_diff"] == 0.0
        assert stats["bitwise_equal"] == 1.0


@pytest.mark.parametrize("precision", ["int4-engine", "fp8-engine"])
def test_plain_trainer_vs_quantised_engine_has_a_gap(precision):
    for stats in rows(precision):
        assert stats["kl_k3"] > 0 and stats["max_abs_diff"] > 0 and stats["bitwise_equal"] < 1.0


def test_unknown_precision_is_one_line():
    result = CliRunner().invoke(app, ["align-check", "--recipe", "tiny", "--precision", "int3"])
    assert result.exit_code != 0 and "int3" in result.output and "int4-qat" in result.output
