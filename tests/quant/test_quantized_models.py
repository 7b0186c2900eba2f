"""Quantised checkpoints in the engine and trainer (dequantise-on-load), INT4 QAT (bitwise the
weights `miles quantize` writes, straight-through gradient) and quantised weight sync."""

from __future__ import annotations

import json

import pytest
import torch

from miles_core.checkpoint.hf import iter_dense_state_dict, load_state_dict
from miles_core.checkpoint.loading import load_model
from miles_core.checkpoint.sources import resolve_model_source
from miles_core.config import ModelConfig, SyncConfig
from miles_core.quant.formats import QuantSpec
from miles_core.quant.int4 import fake_quantize_int4
from miles_core.quant.qat import FakeQuantLinear, apply_int4_qat
from miles_core.sync import SyncContext, build_weight_sync
from miles_core.sync.quantized import round_tripped
from quant_helpers import logits, quantize

EXPERTS = ("*.mlp.experts.*",)


IDS = torch.tensor([[3, 77, 120, 9, 200, 45, 61], [8, 8, 100, 250, 31, 2, 19]])


@pytest.mark.parametrize("args, spec", [
    (["--format", "fp8"], QuantSpec("fp8")),
    (["--format", "int4", "--group-size", "32"], QuantSpec("int4", 32)),
])
def test_quantised_checkpoint_loads_and_matches_dequantised_reference(tmp_path, args, spec):
    loaded = load_model(ModelConfig(source=str(quantize(tmp_path, *args)), device="cpu"))
    assert "quantization_config" not in loaded.hf_config  # exports of this model are dense
    reference = load_model(ModelConfig(source="tiny-qwen3-moe", device="cpu")).model
    source = load_state_dict(resolve_model_source("tiny-qwen3-moe"))
    reference.load_state_dict(dict(round_tripped(source.items(), spec)), strict=False)
    assert torch.equal(logits(loaded.model, IDS), logits(reference, IDS))
    assert not torch.equal(logits(loaded.model, IDS), logits(load_model(ModelConfig(source="tiny-qwen3-moe", device="cpu")).model, IDS))


def test_qat_model_equals_model_loaded_from_miles_quantize_output(tmp_path):
    """The QAT trainer's forward == a plain model holding `miles quantize --only experts` weights."""
    out = quantize(tmp_path, "--format", "int4", "--group-size", "32", "--only", EXPERTS[0])
    qat = load_model(ModelConfig(source="tiny-qwen3-moe", device="cpu")).model
    names = apply_int4_qat(qat, QuantSpec("int4", 32, include=EXPERTS))
    assert len(names) == 2 * 8 * 3 and all(".mlp.experts." in n for n in names)
    assert isinstance(qat.model.layers[0].mlp.experts[0].up_proj, FakeQuantLinear)
    assert type(qat.model.layers[0].mlp.gate).__name__ == "TopKRouter"  # routers stay as they are
    served = load_model(ModelConfig(source=str(out), device="cpu")).model
    assert torch.equal(logits(qat, IDS), logits(served, IDS))
    dense = dict(iter_dense_state_dict(out))
    assert torch.equal(dense["model.layers.0.self_attn.q_proj.weight"], qat.state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_straight_through_gradient():
    """dL/dW of a fake-quantised Linear is the plain Linear's gradient taken at W_fq: x^T g."""
    layer = load_model(ModelConfig(source="tiny-qwen3-moe", device="cpu")).model.model.layers[0].mlp.experts[1].down_proj
    weight = layer.weight.detach().clone()
    apply_int4_qat(torch.nn.ModuleDict({"mlp": torch.nn.ModuleDict({"experts": torch.nn.ModuleList([layer])})}),
                   QuantSpec("int4", 32, include=("mlp.experts.*",)))
    x = torch.randn(5, weight.shape[1], generator=torch.Generator().manual_seed(0))
    g = torch.randn(5, weight.shape[0], generator=torch.Generator().manual_seed(1))
    (layer(x) * g).sum().backward()
    fq = fake_quantize_int4(weight, 32).requires_grad_(True)
    (torch.nn.functional.linear(x, fq) * g).sum().backward()
    assert torch.equal(layer.weight.grad, fq.grad) and torch.equal(layer.weight.grad, g.T @ x)
    assert torch.equal(layer.weight, weight)  # masters untouched by the forward


def test_qat_errors_are_clear():
    model = load_model(ModelConfig(source="tiny-qwen3-moe", device="cpu")).model
    with pytest.raises(ValueError, match=r"no Linear module matches \['\*nothing\*'\]"):
        apply_int4_qat(model, QuantSpec("int4", 32, include=("*nothing*",)))
    with pytest.raises(ValueError, match="group size 64 does not divide its 32 input features"):
        apply_int4_qat(model, QuantSpec("int4", 64, include=EXPERTS))


class _Engine:
    """Records what a weight sync hands over."""

    is_remote = False

    def __init__(self):
        self.received, self.calls = {}, []

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")

    def flush_cache(self):
        self.calls.append("flush")

    def update_weights(self, named, version):
        self.received.update((n, t.clone()) for n, t in named)
        self.version = version


@pytest.mark.parametrize("transport", ["inprocess", "disk"])
def test_quantised_sync_delivers_what_miles_quantize_writes(tmp_path, transport):
    source = resolve_model_source("tiny-qwen3-moe")
    weights = load_state_dict(source)
    expected = dict(iter_dense_state_dict(quantize(tmp_path, "--format", "int4", "--group-size", "32")))
    engine = _Engine()
    context = SyncContext(json.loads((source / "config.json").read_text()), source, tmp_path / "sync")
    sync = build_weight_sync(SyncConfig(transport=transport, quantize="int4", quantize_group_size=32), engine, context)
    sync.push(weights.items(), version="3")
    assert engine.version == "3" and engine.calls[0] == "pause" and engine.calls[-1] == "resume"
    assert engine.received.keys() == expected.keys()
    assert all(torch.equal(engine.received[n], expected[n]) for n in expected)
    if transport == "disk":
        [folder] = (tmp_path / "sync").iterdir()
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert qc["format"] == "pack-quantized" and "model.layers.1.mlp.gate" in qc["ignore"]
