"""`miles train` checkpoints are complete for every family: every parameter and every persistent
buffer (DeepSeek-V3's `e_score_correction_bias`) is saved, so `transformers` reproduces the native
logits and `miles convert` round-trips them through torch_dist bitwise."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.checkpoint.hf import iter_state_dict
from miles_core.checkpoint.sources import _write_tiny
from miles_core.models.tiny import TINY_QWEN3_CONFIG
from miles_core.config import ModelConfig
from miles_core.models.base import named_weights
from miles_core.checkpoint.loading import load_model

runner = CliRunner()
DENSE = {"llama": ("LlamaForCausalLM", {"tie_word_embeddings": True}), "qwen2": ("Qwen2ForCausalLM", {})}
SOURCES = {"qwen3": "tiny-qwen3", "qwen3_moe": "tiny-qwen3-moe", "deepseek_v3": "tiny-deepseek-v3"}


def source_for(family: str, tmp_path) -> str:
    if family in SOURCES:
        return SOURCES[family]
    architecture, extra = DENSE[family]
    config = {**TINY_QWEN3_CONFIG, "model_type": family, "architectures": [architecture], **extra}
    return str(_write_tiny(tmp_path / f"tiny-{family}", config))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3"])
def test_trained_checkpoint_loads_in_transformers_and_round_trips(tmp_path, family):
    from transformers import AutoModelForCausalLM

    source = source_for(family, tmp_path)
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--output-dir", str(tmp_path / "run"),
                                 "--num-rollout", "1", "--set", f"model.source={json.dumps(source)}",
                                 "--set", "rollout.batch_size=2"])
    assert result.exit_code == 0, result.output
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    native = load_model(ModelConfig(source=str(ckpt), device="cpu")).model
    saved = dict(iter_state_dict(ckpt))
    expected = {n for n, _ in named_weights(native)} - ({"lm_head.weight"} if family == "llama" else set())
    assert saved.keys() == expected
    if family == "deepseek_v3":
        assert any(n.endswith("e_score_correction_bias") for n in saved)
        assert not any("inv_freq" in n for n in saved)

    hf = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    tokens = torch.arange(3, 40).remainder(256)[None]
    with torch.no_grad():
        ours = native.lm_head(native(tokens, torch.arange(tokens.shape[1])[None]))
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    for to, src, dst in (("torch_dist", ckpt, tmp_path / "dist"), ("hf", tmp_path / "dist", tmp_path / "back")):
        converted = runner.invoke(app, ["convert", str(src), str(dst), "--to", to])
        assert converted.exit_code == 0, converted.output
    back = dict(iter_state_dict(tmp_path / "back"))
    assert back.keys() == saved.keys()
    assert all(back[n].dtype == t.dtype and torch.equal(back[n], t) for n, t in saved.items())
