"""Block FP8: hand-computed scales, the e4m3 round-trip error bound, partial blocks, bad inputs."""

from __future__ import annotations

import pytest
import torch

from miles_core.quant.fp8 import (
    FP8_DTYPE, dequantize_fp8_block, fp8_block_scales, fp8_error_bound, quantize_fp8_block,
)


def test_scale_is_block_amax_over_448_and_exact_values_survive():
    # Block (0, 0) holds amax 448 -> scale 1; e4m3 represents 1, 2.5 (=1.25*2) and -448 exactly.
    # Block (0, 1) holds amax 8.96 -> scale 0.02; block (1, *) is all zero -> scale 1.
    weight = torch.zeros(200, 130)
    weight[0, 0], weight[5, 7], weight[127, 127] = 448.0, 2.5, -448.0
    weight[3, 128] = 8.96
    q, scale = quantize_fp8_block(weight)
    assert q.dtype == FP8_DTYPE and q.shape == (200, 130) and scale.dtype == torch.float32
    expected = torch.tensor([[1.0, 8.96 / 448], [1.0, 1.0]], dtype=torch.float32)
    assert torch.equal(scale, expected)
    back = dequantize_fp8_block(q, scale)
    assert back[0, 0] == 448.0 and back[5, 7] == 2.5 and back[127, 127] == -448.0
    # 8.96 / (8.96/448) rounds to 448 or one fp32 ulp from it; the cast lands on 448 -> exact amax.
    assert back[3, 128] == pytest.approx(8.96, rel=1e-6)
    assert int((back != 0).sum()) == 4


@pytest.mark.parametrize("shape", [(1, 1), (127, 129), (128, 128), (129, 257), (300, 64)])
def test_round_trip_error_within_e4m3_bound(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(shape, generator=generator) * torch.logspace(-4, 1, shape[1])  # wide dynamic range
    q, scale = quantize_fp8_block(weight)
    assert scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    error = (dequantize_fp8_block(q, scale) - weight).abs()
    # 3 mantissa bits: <= 2^-4 relative (normals), <= 2^-10 * scale (subnormals); 1e-6 for fp32 rounding.
    assert bool((error <= fp8_error_bound(weight, scale) * (1 + 1e-6)).all())
    assert float(q.float().abs().max()) == 448.0  # every weight's largest block hits the top of the range


def test_bf16_weight_and_output_dtype():
    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    q, scale = quantize_fp8_block(weight)
    out = dequantize_fp8_block(q, scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and scale.dtype == torch.float32
    assert float((out.float() - weight.float()).abs().max()) <= float(weight.float().abs().max()) * 2**-4


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="2-D weight"):
        quantize_fp8_block(torch.ones(4))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_fp8_block(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_fp8_block(torch.tensor([[1.0, float("nan")]]))
    q, _ = quantize_fp8_block(torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"must have shape \(1, 1\), got \(2, 1\)"):
        dequantize_fp8_block(q, torch.ones(2, 1))
    with pytest.raises(ValueError, match="float8_e4m3fn weight"):
        dequantize_fp8_block(torch.ones(4, 4), torch.ones(1, 1))
    assert torch.equal(fp8_block_scales(torch.zeros(3, 3)), torch.ones(1, 1))
