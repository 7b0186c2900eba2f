"""`miles align-check --layers` runs the trainer's path exactly as training does: weights a model
keeps in fp32 whatever its dtype (DeepSeek-V3's router, `keep_in_fp32`) stay fp32 in the
per-layer replay. Cast to bf16 with the rest, the routers chose other experts and the report
showed a mismatch from the first MoE layer on that training does not have."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from miles_cli.app import app


def test_bf16_deepseek_layers_agree_exactly_in_invariant_mode():
    result = CliRunner().invoke(app, [
        "align-check", "--recipe", "tiny-deepseek", "--layers", "2", "--batch-sizes", "4", "--num-prompts", "2",
        "--set", "model.dtype=bfloat16", "--set", "train.compute_dtype=bfloat16",
        "--set", "alignment.mode=invariant", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {row["module"]: row for row in report["layers"]}
    assert set(rows) == {"embed_tokens", "layers.0", "layers.1", "layers.2", "norm", "logits"}
    # layers.1 and layers.2 are MoE layers (first_k_dense_replace = 1): a bf16 router gave 1e-4 and 1e-3 there
    assert all(row["max_abs_diff"] == 0.0 and row["bitwise_equal"] == 1.0 for row in rows.values()), rows
    assert report["results"][0]["routing_agreement"] == 1.0
