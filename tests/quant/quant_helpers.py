"""Shared pieces of the quantised-model tests: logits of a native model, and a tiny MoE
checkpoint quantised by `miles quantize` through the CLI."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from miles_cli.app import app

runner = CliRunner()


def logits(model, ids_BT):
    positions = torch.arange(ids_BT.shape[1]).expand_as(ids_BT)
    with torch.no_grad():
        return model.lm_head(model(ids_BT, positions))


def quantize(tmp_path, *args):
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", "tiny-qwen3-moe", str(out), *args])
    assert result.exit_code == 0, result.output
    return out
