"""Invariant-mode Triton kernels for RoPE, SwiGLU and packed attention (GPU): close to the eager
references, a row's bits independent of the rest of the launch, packed rows bitwise equal to one
call per segment, and gradients equal to the references' (the trainer differentiates them)."""

from __future__ import annotations

import pytest
import torch

from miles_core.kernels import invariant, triton_ops
from miles_core.kernels.attention import attention_reference
from miles_core.kernels.elementwise import rotary_reference, silu_mul_reference
from miles_core.kernels.packed import PackedSegments, segment_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_ops.available(), reason="needs CUDA and Triton")]


def _angles(T: int, D: int, dtype, gen) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.randn(1, T, D // 2, device="cuda", generator=gen) * 3
    angles = torch.cat((freqs, freqs), dim=-1)  # HF's layout: both halves share the frequencies
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [64, 128, 96])
def test_rotary_kernel_is_close_to_eager_and_row_invariant(dtype, D):
    from miles_core.kernels import rotary_triton

    gen = torch.Generator(device="cuda").manual_seed(0)
    # q as the attention makes it: a (B, T, H, D) projection viewed as (B, H, T, D), not contiguous
    x = torch.randn(3, 5, 4, D, device="cuda", generator=gen).to(dtype).transpose(1, 2)
    cos, sin = _angles(5, D, dtype, gen)
    out = rotary_triton.rotary(x, cos, sin)
    ref = rotary_reference(x.float(), cos.float(), sin.float())
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # one rounding of the fp32 result
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    decode = rotary_triton.rotary(x[1:2, :, -1:], cos[:, -1:], sin[:, -1:])  # one token alone: same bits
    assert torch.equal(decode, out[1:2, :, -1:])


def test_rotary_kernel_gradient_is_eager_rope_gradient():
    from miles_core.kernels import rotary_triton

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 4, 7, 64, device="cuda", generator=gen, requires_grad=True)
    freqs = torch.randn(2, 7, 64, device="cuda", generator=gen)  # halves differ: the general transpose
    cos, sin = freqs.cos(), freqs.sin()
    upstream = torch.randn(2, 4, 7, 64, device="cuda", generator=gen)
    (grad,) = torch.autograd.grad(rotary_triton.rotary(x, cos, sin), x, upstream)
    (expected,) = torch.autograd.grad(rotary_reference(x, cos, sin), x, upstream)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_kernel_is_close_to_eager_row_invariant_and_differentiable(dtype):
    """On the fused gate/up projection's halves (strided views), as the engine calls it."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    gate, up = (torch.randn(4, 9, 2 * 3072, device="cuda", generator=gen) * 3).to(dtype).chunk(2, dim=-1)
    out = invariant.silu_mul(gate, up)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # one rounding of the fp32 result
    torch.testing.assert_close(out.float(), silu_mul_reference(gate.float(), up.float()), rtol=tol, atol=tol)
    assert torch.equal(invariant.silu_mul(gate[2:3, 4:5], up[2:3, 4:5]), out[2:3, 4:5])  # one token alone
    g, u = gate.float().requires_grad_(), up.float().requires_grad_()
    upstream = torch.randn(g.shape, device="cuda", generator=gen)
    grads = torch.autograd.grad(invariant.silu_mul(g, u), (g, u), upstream)
    expected = torch.autograd.grad(silu_mul_reference(g, u), (g, u), upstream)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _packed_row(dtype, gen):
    """A row of five segments: a prompt (70 tokens), two responses sharing it as prefix, and two
    plain sequences (one longer than a 64-token tile); 8 query heads over 2 KV heads."""
    segments = [(0, 70, 0, 0), (70, 80, 0, 70), (80, 150, 0, 70), (150, 153, 0, 0), (153, 300, 0, 0)]
    positions = torch.cat([torch.arange(70), torch.arange(70, 80), torch.arange(70, 140), torch.arange(3),
                           torch.arange(147)]).cuda()[None]
    q = torch.randn(1, 300, 8, 64, device="cuda", generator=gen).to(dtype).transpose(1, 2)
    k, v = (torch.randn(1, 2, 300, 64, device="cuda", generator=gen).to(dtype) for _ in range(2))
    return q, k, v, positions, segments


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_attention_gives_each_segment_its_separate_call_bits(dtype):
    gen = torch.Generator(device="cuda").manual_seed(2)
    q, k, v, positions, segments = _packed_row(dtype, gen)
    packed = triton_ops.packed_attention(q, k, v, positions, PackedSegments.for_device(segments, "cuda"))
    per_segment = segment_attention(invariant.attention, q, k, v, positions,
                                    PackedSegments(segments))
    assert torch.equal(packed, per_segment)
    reference = segment_attention(attention_reference, q.float(), k.float(), v.float(), positions,
                                  PackedSegments(segments))
    assert ((packed.float() - reference).norm() / reference.norm()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_gradients_are_the_reference_gradients(dtype):
    """bf16 differentiates flash attention's varlen call, fp32 the segment loop."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, positions, segments = _packed_row(dtype, gen)
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    upstream = torch.randn(1, 8, 300, 64, device="cuda", generator=gen).to(dtype)
    out = triton_ops.packed_attention(q, k, v, positions, PackedSegments.for_device(segments, "cuda"))
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    wide = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    reference = segment_attention(attention_reference, *wide, positions, PackedSegments(segments))
    expected = torch.autograd.grad(reference, wide, upstream.double())
    for got, want in zip(grads, expected):
        assert ((got.double() - want).norm() / want.norm()) < (1e-5 if dtype == torch.float32 else 2e-2)
