"""Group INT4: hand-computed integers and packing, and parity with compressed-tensors' own code
(its `quantize`, `pack_to_int32` / `unpack_from_int32` and its pack-quantized decompressor),
bitwise on the integers, the packed words, the scales and the dequantised weights."""

from __future__ import annotations

import pytest
import torch

from miles_core.quant.int4 import (
    dequantize_int4, fake_quantize_int4, int4_group_scales, pack_int4, quantize_int4, unpack_int4,
)

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


def test_hand_computed_group():
    # One group of 8 (group size 8 here only for the arithmetic): amax 1.5 -> scale 1.5/7.5 = 0.2;
    # w/s = [7.5, -7.5, 1, 0.5, -0.5, 2.6, 0, -3.2] -> clamp [-8, 7] -> round half to even:
    # [7, -8 (-7.5 rounds to -8), 1, 0, -0, 3, 0, -3]; packed nibbles q+8 = [15, 0, 9, 8, 8, 11, 8, 5],
    # word = 0x58B889 0F (nibble i at bits 4i) = 0x58B8890F.
    weight = torch.tensor([[1.5, -1.5, 0.2, 0.1, -0.1, 0.52, 0.0, -0.64]], dtype=torch.float64)
    q, scale = quantize_int4(weight, 8)
    assert scale.tolist() == [[1.5 / 7.5]]
    assert q.tolist() == [[7, -8, 1, 0, 0, 3, 0, -3]]
    assert pack_int4(q).tolist() == [[0x58B8890F]]
    assert torch.equal(unpack_int4(pack_int4(q), (1, 8)), q)
    assert torch.equal(dequantize_int4(q, scale), q.double() * 0.2)


def test_word_with_top_nibble_set_is_negative_int32():
    q = torch.full((1, 8), 7, dtype=torch.int8)  # every nibble 15 -> 0xFFFFFFFF = -1 as int32
    assert pack_int4(q).tolist() == [[-1]]
    assert pack_int4(torch.full((2, 16), -8, dtype=torch.int8)).tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 128])
def test_matches_compressed_tensors_bitwise(dtype, group_size):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import quantize

    generator = torch.Generator().manual_seed(group_size)
    weight = (torch.randn(48, 256, generator=generator) * 0.05).to(dtype)
    weight[3, :group_size] = 0.0  # an all-zero group takes the epsilon scale
    q, scale = quantize_int4(weight, group_size)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    theirs_q = quantize(x=weight, scale=scale, zero_point=torch.zeros_like(scale), args=args, dtype=torch.int8)
    assert torch.equal(q, theirs_q)
    packed = pack_int4(q)
    assert torch.equal(packed, ct_helpers.pack_to_int32(q, 4))
    assert torch.equal(ct_helpers.unpack_from_int32(packed, 4, torch.Size(weight.shape)), q)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor(weight.shape)}
    theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    ours = dequantize_int4(unpack_int4(packed, tuple(weight.shape)), scale)
    assert theirs.dtype == ours.dtype == dtype and torch.equal(theirs, ours)
    assert torch.equal(fake_quantize_int4(weight, group_size), ours)


def test_error_bound_half_a_step():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 128, generator=generator)
    q, scale = quantize_int4(weight, 32)
    error = (dequantize_int4(q, scale) - weight).abs().view(16, 4, 32)
    # Inside [-8, 7] steps rounding is off by <= s/2; the +amax end clamps 7.5 to 7: off by s/2 too.
    assert bool((error <= scale[..., None] * 0.5 * (1 + 1e-6)).all())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="group size 48 does not divide its 64 input features"):
        int4_group_scales(torch.ones(2, 64), 48)
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\], got \[0, 9\]"):
        pack_int4(torch.tensor([[0, 9, 0, 0, 0, 0, 0, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"must be \(2, 2\), got \(2, 3\)"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.int32), (2, 16))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int4(torch.full((1, 32), float("inf")), 32)
