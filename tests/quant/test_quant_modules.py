"""Engines holding quantised weights (`QuantLinear`, `engine.weights = "quantized"`): same logits
as the dequantised model on CPU, bitwise, in both alignment modes; sync and the trainer's copy."""

from __future__ import annotations

import pytest
import torch

from miles_core.checkpoint.loading import load_model
from miles_core.config import ModelConfig
from miles_core.errors import MilesError
from miles_core.quant.fp8 import FP8_DTYPE
from miles_core.quant.modules import QuantLinear, dense_copy, holds_quantized, quantize_updates
from quant_helpers import logits, quantize

IDS = torch.tensor([[3, 77, 120, 9, 200, 45, 61], [8, 8, 100, 250, 31, 2, 19]])
FORMATS = [["--format", "fp8"], ["--format", "int4", "--group-size", "32"]]


@pytest.mark.parametrize("args", FORMATS, ids=["fp8", "int4"])
@pytest.mark.parametrize("mode", ["fast", "invariant"])
def test_swapped_model_logits_equal_dequantised_model_bitwise(tmp_path, args, mode):
    path = quantize(tmp_path, *args)
    dense = load_model(ModelConfig(source=str(path), device="cpu"), alignment_mode=mode).model
    swapped = load_model(ModelConfig(source=str(path), device="cpu"), alignment_mode=mode, quantized=True).model
    quant = [m for m in swapped.modules() if isinstance(m, QuantLinear)]
    assert quant and all(m.ops.name == mode for m in quant)
    # Every Linear but the routers (kept dense by default) holds quantised tensors.
    assert swapped.model.layers[0].self_attn.q_proj.fmt == args[1]
    assert type(swapped.model.layers[0].mlp.gate).__name__ == "TopKRouter"
    assert torch.equal(logits(swapped, IDS), logits(dense, IDS))
    # The trainer's copy: dense again, with exactly the dequantised weights.
    copy = dense_copy(swapped)
    assert not holds_quantized(copy) and holds_quantized(swapped)
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), dense.state_dict().values()))
    assert copy.state_dict().keys() == dense.state_dict().keys()


def test_quantized_weights_stay_quantised_in_memory(tmp_path):
    swapped = load_model(ModelConfig(source=str(quantize(tmp_path, "--format", "fp8")), device="cpu"),
                         quantized=True).model
    proj = swapped.model.layers[0].self_attn.q_proj
    assert proj.weight.dtype == FP8_DTYPE and proj.weight_scale_inv.dtype == torch.float32
    assert proj.weight_scale_inv.shape == (1, 1)  # 64 x 64 weight: one partial 128 x 128 block


def test_dense_checkpoint_with_quantized_engine_is_a_clear_error():
    with pytest.raises(MilesError, match="needs a quantised checkpoint"):
        load_model(ModelConfig(source="tiny-qwen3-moe", device="cpu"), quantized=True)


@pytest.mark.parametrize("args", FORMATS, ids=["fp8", "int4"])
def test_dense_updates_are_quantised_like_miles_quantize(tmp_path, args):
    # Syncing the dense source weights into the quantised engine rebuilds the checkpoint's tensors.
    path = quantize(tmp_path, *args)
    swapped = load_model(ModelConfig(source=str(path), device="cpu"), quantized=True).model
    source = load_model(ModelConfig(source="tiny-qwen3-moe", device="cpu")).model
    stored = {k: v.clone() for k, v in swapped.state_dict().items()}
    updates = dict(quantize_updates(swapped, source.state_dict().items()))
    assert updates.keys() == stored.keys() | {"lm_head.weight"}  # tied head: the embedding's name too
    for name, value in stored.items():
        assert torch.equal(updates[name].to(value.dtype), value), name


def test_engine_generates_with_quantised_weights_and_takes_dense_sync(tmp_path):
    from miles_core.config import EngineConfig, SamplingConfig
    from miles_core.engine import build_engine
    from miles_core.engine.protocol import GenerateRequest

    path = quantize(tmp_path, "--format", "int4", "--group-size", "32")
    loaded = load_model(ModelConfig(source=str(path), device="cpu"), alignment_mode="invariant", quantized=True)
    engine = build_engine(EngineConfig(max_batch_size=2, max_context_len=64), loaded)
    request = GenerateRequest(input_ids=[3, 77, 120], sampling=SamplingConfig(max_new_tokens=5, temperature=0.0,
                                                                               n_samples_per_prompt=1))
    before = engine.generate([request])[0][0]
    dense = load_model(ModelConfig(source=str(path), device="cpu"), alignment_mode="invariant")
    dense_engine = build_engine(EngineConfig(max_batch_size=2, max_context_len=64), dense)
    reference = dense_engine.generate([request])[0][0]
    assert before.output_ids == reference.output_ids and before.output_logprobs == reference.output_logprobs
    # The dense source weights, synced in, are quantised on the way: the checkpoint's weights again.
    source = load_model(ModelConfig(source="tiny-qwen3-moe", device="cpu")).model
    engine.update_weights(source.state_dict().items(), version="1")
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, QuantLinear)
    after = engine.generate([request])[0][0]
    assert after.output_ids == before.output_ids and after.output_logprobs == before.output_logprobs
