"""Quantised tensors for engines that hold dense weights (`sync.quantize` over `nccl` / `cuda_ipc`):
a bucket keeps a quantised weight's parts together, the engine dequantises each module on arrival
to exactly the dense round trip's bits, and a part that comes alone is refused before anything
is written. (End to end over gloo with a `miles serve` process: tests/sync/test_nccl_sync.py.)"""

from __future__ import annotations

import pytest
import torch

from miles_core.checkpoint.loading import load_model
from miles_core.config import ModelConfig
from miles_core.engine.native.weight_table import WeightTable
from miles_core.errors import MilesError
from miles_core.quant.formats import QuantSpec
from miles_core.quant.modules import dense_updates
from miles_core.quant.formats import COMPANION_SUFFIXES
from miles_core.sync.protocol import buckets
from miles_core.sync.quantized import quantized, round_tripped


@pytest.fixture(scope="module")
def model():
    return load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model


def _weights(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(n, p.detach() + torch.randn(p.shape, generator=gen)) for n, p in model.named_parameters()]


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_buckets_never_split_a_quantised_weight_from_its_parts(model, fmt):
    sent = list(quantized(_weights(model), QuantSpec(fmt, 32)))
    assert any(n.endswith(COMPANION_SUFFIXES) for n, _ in sent)
    split = list(buckets(sent, 1))  # every tensor over the size: alone, unless it completes the one before
    assert [t for bucket in split for t in bucket] == sent
    assert all(not bucket[0][0].endswith(COMPANION_SUFFIXES) for bucket in split)
    assert len(split) == sum(not n.endswith(COMPANION_SUFFIXES) for n, _ in sent)


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_a_dense_engine_dequantises_to_the_round_trips_bits(model, fmt):
    spec = QuantSpec(fmt, 32)
    weights = _weights(model, seed=1)
    targets, sources, key = WeightTable(model).checked_updates(quantized(weights, spec))
    expected = dict(round_tripped(weights, spec))
    held = dict(model.named_parameters())
    assert len(sources) == len(expected) and key is None  # converted: never kept as passed through
    for target, source in zip(targets, sources):
        name = next(n for n, p in held.items() if p is target)
        assert torch.equal(source.to(target.dtype), expected[name]), name
    assert any(not torch.equal(expected[n], w) for n, w in weights)  # quantisation changed something


def test_plain_updates_pass_through_untouched(model):
    weights = _weights(model)
    assert dense_updates(dict(model.named_parameters()), weights) is weights


@pytest.mark.parametrize("fmt,drop,message", [
    ("fp8", "weight_scale_inv", "came without 'model.layers.0.self_attn.q_proj.weight_scale_inv'"),
    ("fp8", "weight", "came without 'model.layers.0.self_attn.q_proj.weight'"),
    ("int4", "weight_shape", "came without 'model.layers.0.self_attn.q_proj.weight_shape'"),
    ("int4", "weight_packed", "came without 'model.layers.0.self_attn.q_proj.weight_packed'"),
])
def test_a_part_that_comes_alone_is_refused(model, fmt, drop, message):
    sent = [(n, t) for n, t in quantized(_weights(model), QuantSpec(fmt, 32))
            if n != f"model.layers.0.self_attn.q_proj.{drop}"]
    with pytest.raises(MilesError, match=message.replace(".", r"\.")):
        WeightTable(model).checked_updates(sent)
