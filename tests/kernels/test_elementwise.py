"""The fused elementwise chains of fast mode: eager bits on CPU, close to eager on CUDA (and
actually compiled there: a compile failure would silently fall back, so it fails the test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from miles_core.kernels import FAST_OPS, INVARIANT_OPS, elementwise
from miles_core.kernels.norms import rms_norm_reference


def _inputs(device: str, dtype=torch.bfloat16):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(3, 4, 5, 64, device=device, generator=gen).to(dtype)  # (B, H, T, D)
    angles = torch.randn(3, 5, 32, device=device, generator=gen)
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    weight = torch.randn(64, device=device, generator=gen).to(dtype)
    return x, cos, sin, weight


def _expected(x, cos, sin, weight):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return (rms_norm_reference(x, weight, 1e-6), x * cos[:, None] + rotated * sin[:, None],
            F.silu(x) * x.flip(-1))


@pytest.mark.parametrize("ops", [FAST_OPS, INVARIANT_OPS], ids=lambda o: o.name)
def test_cpu_runs_the_eager_references_bit_for_bit(ops):
    x, cos, sin, weight = _inputs("cpu")
    norm, rope, swiglu = _expected(x, cos, sin, weight)
    if ops is FAST_OPS:  # the invariant rms_norm is a fixed-order kernel (tests/alignment)
        assert torch.equal(ops.rms_norm(x, weight, 1e-6), norm)
    assert torch.equal(ops.rotary(x, cos, sin), rope)
    assert torch.equal(ops.silu_mul(x, x.flip(-1)), swiglu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_mode_compiles_and_stays_close(monkeypatch):
    monkeypatch.setattr(elementwise.log, "warning", lambda *a: pytest.fail(f"compile fell back: {a}"))
    x, cos, sin, weight = _inputs("cuda")
    norm, rope, swiglu = _expected(x, cos, sin, weight)
    tol = dict(atol=2e-2, rtol=2e-2)
    with torch.inference_mode():  # the engine's forwards; the trainer (autograd) stays eager
        torch.testing.assert_close(FAST_OPS.rms_norm(x, weight, 1e-6), norm, **tol)
        torch.testing.assert_close(FAST_OPS.rotary(x, cos, sin), rope, **tol)
        torch.testing.assert_close(FAST_OPS.silu_mul(x, x.flip(-1)), swiglu, **tol)
    assert torch.equal(FAST_OPS.rotary(x, cos, sin), rope)
    # invariant mode never compiles: its RoPE is one Triton kernel (engine and trainer share it,
    # tests/kernels/test_invariant_triton.py), within rounding of eager's, not eager's bits
    torch.testing.assert_close(INVARIANT_OPS.rotary(x, cos, sin), rope, **tol)
