"""`miles quantize` through Typer: exit codes, files and config written, the size table, the
verification report, atomicity, and what `transformers` / compressed-tensors make of the output."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.checkpoint.hf import iter_dense_state_dict, load_state_dict
from miles_core.checkpoint.sources import resolve_model_source
from miles_core.quant.int4 import fake_quantize_int4

runner = CliRunner()


def _tensors(folder):
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_fp8_files_config_and_sizes(tmp_path):
    out = tmp_path / "fp8"
    result = runner.invoke(app, ["quantize", "tiny-qwen3", str(out), "--format", "fp8", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "quantised" in result.output and "kept dense" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.embed_tokens"]}
    tensors = _tensors(out)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[q_proj].dtype == torch.float8_e4m3fn and tensors[q_proj + "_scale_inv"].shape == (1, 1)
    assert tensors["lm_head.weight"].dtype == torch.float32  # ignored by default, as are norms and embeddings
    assert tensors["model.norm.weight"].dtype == torch.float32
    assert (out / "tokenizer.json").is_file()
    # tiny-qwen3: 14 Linear weights of 2 layers, 4 bytes -> 1 byte + one fp32 scale each.
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["num_quantized"] == 14
    assert report["quantized_bytes_after"] == report["quantized_bytes_before"] // 4 + 14 * 4


def test_int4_verify_and_bitwise_dequantisation(tmp_path):
    out = tmp_path / "int4"
    result = runner.invoke(app, ["quantize", "tiny-qwen3-moe", str(out), "--format", "int4", "--group-size", "32",
                                 "--verify", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "logit KL" in result.output and "top-1 agreement" in result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    assert qc["ignore"] == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    tensors = _tensors(out)
    expert = "model.layers.1.mlp.experts.3.down_proj"
    assert tensors[f"{expert}.weight_packed"].dtype == torch.int32
    assert tensors[f"{expert}.weight_packed"].shape == (64, 32 // 8)  # (hidden 64, moe_intermediate 32 / 8)
    assert tensors[f"{expert}.weight_shape"].tolist() == [64, 32]
    assert tensors["model.layers.0.mlp.gate.weight"].dtype == torch.float32  # the router stays dense
    # The dequantised checkpoint equals the fake-quantised source, bitwise.
    source = load_state_dict(resolve_model_source("tiny-qwen3-moe"))
    dense = dict(iter_dense_state_dict(out))
    assert torch.equal(dense[f"{expert}.weight"], fake_quantize_int4(source[f"{expert}.weight"], 32))
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["errors"]) == report["num_quantized"] == 2 * (4 + 8 * 3)
    # Relative error of INT4 on Gaussian weights with groups of 32: ~0.1; logits stay close.
    assert all(0.05 < e["rel"] < 0.15 for e in report["errors"])
    assert 0 < report["logits"]["kl_mean"] < 1e-2


def test_ignore_patterns_replace_the_defaults(tmp_path):
    out = tmp_path / "fp8"
    result = runner.invoke(app, ["quantize", "tiny-qwen3", str(out), "--format", "fp8",
                                 "--ignore", "*mlp*", "--ignore", "lm_head", "--ignore", "*embed_tokens"])
    assert result.exit_code == 0, result.output
    tensors = _tensors(out)
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    assert tensors["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    dense = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.1.mlp.down_proj" in dense and len(dense) == 2 + 2 * 3


@pytest.mark.parametrize("args, message", [
    (["--format", "fp4"], "unknown quantization format 'fp4'"),
    (["--format", "int4", "--group-size", "48"], "INT4 group size must be one of 32, 64, 128, got 48"),
    (["--format", "int4", "--group-size", "128"], "group size 128 does not divide its 64 input features"),
    (["--format", "fp8", "--ignore", "*"], "nothing to quantise"),
])
def test_bad_options_are_one_line_and_leave_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", "tiny-qwen3", str(out), *args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in " ".join(result.output.split())
    assert not out.exists() and os.listdir(tmp_path) == []


def test_bad_paths(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "empty").mkdir()
    cases = [([str(tmp_path / "empty"), str(tmp_path / "o")], "is not a checkpoint: no config.json"),
             ([str(tmp_path / "nothing"), str(tmp_path / "o")], "is not a directory, a .gguf file or a built-in name"),
             (["tiny-qwen3", str(tmp_path / "taken")], "already exists")]
    for paths, message in cases:
        result = runner.invoke(app, ["quantize", *paths, "--format", "fp8"])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    quantized = tmp_path / "q"
    assert runner.invoke(app, ["quantize", "tiny-qwen3", str(quantized), "--format", "fp8"]).exit_code == 0
    result = runner.invoke(app, ["quantize", str(quantized), str(tmp_path / "again"), "--format", "int4"])
    assert result.exit_code == 2 and "is already quantised (quant_method 'fp8')" in result.output


def test_failure_midway_leaves_no_output_and_source_untouched(tmp_path, monkeypatch):
    source = tmp_path / "src"
    shutil.copytree(resolve_model_source("tiny-qwen3"), source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    import miles_core.checkpoint.quantize as core
    from miles_core.quant.formats import quantize_tensor

    calls = []

    def fails_at_the_fifth(name, tensor, spec):  # a full disk after some output was written
        calls.append(name)
        if len(calls) == 5:
            raise OSError(28, "No space left on device", str(tmp_path / "out"))
        return quantize_tensor(name, tensor, spec)

    monkeypatch.setattr(core, "quantize_tensor", fails_at_the_fifth)
    result = runner.invoke(app, ["quantize", str(source), str(tmp_path / "out"), "--format", "fp8"])
    assert result.exit_code == 1 and "No space left on device" in result.output  # not a path error: 1
    assert sorted(os.listdir(tmp_path)) == ["src"]
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_transformers_loads_fp8_and_int4_outputs(tmp_path):
    """`transformers` reads both outputs on CPU (FP8: its fine-grained FP8 integration dequantises;
    INT4: its compressed-tensors integration decompresses) into the weights we dequantise to."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])
    for fmt in ("fp8", "int4"):
        out = tmp_path / fmt
        assert runner.invoke(app, ["quantize", "tiny-qwen3", str(out), "--format", fmt, "--group-size", "32"]).exit_code == 0
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            model(ids)  # compressed-tensors decompresses on the first forward
        ours = dict(iter_dense_state_dict(out))
        theirs = model.state_dict()
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            assert torch.equal(theirs[name].float(), ours[name]), (fmt, name)
