"""Quantisation scales divide once, with the same bits on CPU and GPU (quant.scales)."""

import pytest
import torch

from miles_core.quant.fp8 import fp8_block_scales
from miles_core.quant.fp8_train import quantize_rowwise
from miles_core.quant.int4 import int4_group_scales
from miles_core.quant.scales import divide_rounded


@pytest.mark.parametrize("divisor", [448.0, 7.5])
def test_divide_rounded_is_the_correctly_rounded_quotient(divisor):
    t = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 300
    assert torch.equal(divide_rounded(t, divisor), (t.double() / divisor).float())
    half = t.bfloat16()
    assert torch.equal(divide_rounded(half, divisor), (half.double() / divisor).bfloat16())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_scales_on_the_gpu_have_the_cpu_bits():
    """torch on CUDA multiplies by 1/448 (1/7.5) for `t / 448.0`: one ulp off in about half the
    rows, so quantising at weight sync on the GPU would not match `miles quantize` on CPU."""
    w = torch.randn(384, 512, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(fp8_block_scales(w.cuda()).cpu(), fp8_block_scales(w))
    assert torch.equal(int4_group_scales(w.bfloat16().cuda(), 32).cpu(), int4_group_scales(w.bfloat16(), 32))
    q_gpu, s_gpu = quantize_rowwise(w.cuda())
    q_cpu, s_cpu = quantize_rowwise(w)
    assert torch.equal(s_gpu.cpu(), s_cpu)
    assert torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8))
