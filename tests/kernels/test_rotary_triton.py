"""Invariant-mode RoPE: the one-pass Triton kernel gives eager RoPE's bits (GPU), and only
half-precision CUDA tensors that need no gradient take it (CPU, with a stand-in kernel)."""

from __future__ import annotations

import pytest
import torch

from miles_core.kernels import invariant, triton_ops
from miles_core.kernels.elementwise import rotary_reference


class _StandIn:
    calls = 0

    def rotary(self, x, cos, sin):
        self.calls += 1
        return rotary_reference(x, cos, sin)


@pytest.fixture
def stand_in(monkeypatch):
    kernel = _StandIn()
    monkeypatch.setattr(invariant, "rotary_triton", kernel)
    monkeypatch.setattr(invariant, "_triton", lambda tensor: True)
    return kernel


def _inputs(dtype, D=8, requires_grad=False):
    x = torch.randn(2, 3, 4, D, dtype=dtype, requires_grad=requires_grad)
    return x, torch.randn(2, 4, D, dtype=dtype), torch.randn(2, 4, D, dtype=dtype)


def test_only_half_precision_without_gradient_takes_the_kernel(stand_in):
    invariant.rotary(*_inputs(torch.bfloat16))
    invariant.rotary(*_inputs(torch.float16))
    assert stand_in.calls == 2
    invariant.rotary(*_inputs(torch.float32))  # an fp32 multiply-add could become an FMA
    invariant.rotary(*_inputs(torch.bfloat16, requires_grad=True))  # the trainer: eager has the backward
    invariant.rotary(*_inputs(torch.bfloat16, D=12))  # a half of 6 is not a power of two
    assert stand_in.calls == 2
    with torch.no_grad():
        invariant.rotary(*_inputs(torch.bfloat16, requires_grad=True))
    assert stand_in.calls == 3


@pytest.mark.gpu
@pytest.mark.skipif(not triton_ops.available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_gives_eager_bits(dtype, D):
    from miles_core.kernels import rotary_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    # q as the attention makes it: a (B, T, H, D) projection viewed as (B, H, T, D), not contiguous
    x = torch.randn(3, 5, 4, D, device="cuda", generator=gen).to(dtype).transpose(1, 2)
    angles = torch.randn(1, 5, D, device="cuda", generator=gen) * 3  # one table shared by the batch
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    out = rotary_triton.rotary(x, cos, sin)
    assert torch.equal(out.view(torch.int16), rotary_reference(x, cos, sin).contiguous().view(torch.int16))
    decode = rotary_triton.rotary(x[:1, :, -1:], cos[:, -1:], sin[:, -1:])  # one row alone: same bits
    assert torch.equal(decode, out[:1, :, -1:])
