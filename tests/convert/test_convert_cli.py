"""`miles convert` through Typer: exit codes, the summary table, files written, JSON report."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from miles_cli.app import app

runner = CliRunner()


def test_convert_to_torch_dist_and_back(tiny_hf, tmp_path):
    result = runner.invoke(app, ["convert", str(tiny_hf("deepseek_v3")), str(tmp_path / "dist"), "--to", "torch_dist",
                                 "--verify", "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    assert "bitwise identical" in result.output and "MTP layers" in result.output
    assert (tmp_path / "dist" / "release" / ".metadata").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bitwise"]["ok"] and report["mtp_num_layers"] == 1 and report["to"] == "torch_dist"

    result = runner.invoke(app, ["convert", str(tmp_path / "dist"), str(tmp_path / "hf"), "--to", "hf",
                                 "--mtp-num-layers", "0", "--verify"])
    assert result.exit_code == 0, result.output
    assert "kl 0" in result.output and (tmp_path / "hf" / "config.json").is_file()


def test_bad_input_is_one_line_and_exit_code_2(tiny_hf, tmp_path):
    result = runner.invoke(app, ["convert", str(tiny_hf("qwen3")), str(tmp_path / "out"), "--to", "torch_dist",
                                 "--mtp-num-layers", "1"])
    assert result.exit_code == 2
    assert "error:" in result.output and "has MTP weights for 0 layer" in result.output
    assert not (tmp_path / "out").exists()
    assert runner.invoke(app, ["convert", "--help"]).exit_code == 0
