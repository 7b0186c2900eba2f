"""Chunked log-prob/entropy kernel vs the plain full-logits reference, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from miles_core.kernels.logprobs import chunked_logprobs_entropy, reference_logprobs_entropy


def _inputs(n: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, 16, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (n,), generator=gen)
    return hidden, weight, targets


def test_hand_computed_two_token_vocab():
    # logits z = W h = [1, 0] with T = 1: log p(0) = 1 - log(e + 1) = -0.313262,
    # log p(1) = -1.313262; entropy = -(0.731059 * -0.313262 + 0.268941 * -1.313262) = 0.582203.
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[1.0], [0.0]])
    logp, entropy = chunked_logprobs_entropy(hidden, weight, torch.tensor([1]), 1.0, chunk_size=1)
    assert logp.item() == pytest.approx(-math.log(math.e + 1), abs=1e-6)
    assert entropy.item() == pytest.approx(0.582203, abs=1e-6)


@pytest.mark.parametrize("n", [1, 127, 128, 129, 300])
def test_chunked_matches_reference_values_and_gradients(n):
    hidden, weight, targets = _inputs(n)
    grad_lp, grad_ent = torch.randn(n), torch.randn(n)
    ref_lp, ref_ent = reference_logprobs_entropy(hidden, weight, targets, 0.7)
    ref_grads = torch.autograd.grad((ref_lp * grad_lp).sum() + (ref_ent * grad_ent).sum(), (hidden, weight))
    lp, ent = chunked_logprobs_entropy(hidden, weight, targets, 0.7, chunk_size=128)
    grads = torch.autograd.grad((lp * grad_lp).sum() + (ent * grad_ent).sum(), (hidden, weight))
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use", ["both", "logp", "entropy"])
def test_gradcheck_in_double(use):
    hidden, weight, targets = _inputs(5, torch.float64)
    pick = {"both": lambda o: o, "logp": lambda o: o[0], "entropy": lambda o: o[1]}[use]
    assert torch.autograd.gradcheck(
        lambda h, w: pick(chunked_logprobs_entropy(h, w, targets, 0.7, chunk_size=2)), (hidden, weight))


def test_no_tokens_gives_empty_values_and_zero_gradients():
    """A context-parallel rank may hold none of a micro-batch's targets: (0,) values, zero gradients."""
    hidden = torch.randn(0, 4, requires_grad=True)
    weight = torch.randn(6, 4, requires_grad=True)
    logp, entropy = chunked_logprobs_entropy(hidden, weight, torch.zeros(0, dtype=torch.long), chunk_size=2)
    assert logp.shape == entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert hidden.grad.shape == (0, 4) and torch.equal(weight.grad, torch.zeros(6, 4))


def test_chunk_size_must_be_positive():
    hidden, weight, targets = _inputs(3)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        chunked_logprobs_entropy(hidden, weight, targets, 1.0, chunk_size=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_weight_gradient_on_cuda_matches_fp32_reference():
    # The half-GEMM weight gradient (fp32 output) against the fp32 reference on the same bf16
    # inputs: within bf16 rounding of grad_z (relative 2^-8 of the largest entry).
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 64, generator=gen, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(1000, 64, generator=gen, device="cuda") * 0.1).bfloat16().requires_grad_()
    targets = torch.randint(0, 1000, (300,), generator=gen, device="cuda")
    logp, _ = chunked_logprobs_entropy(hidden, weight, targets, chunk_size=128)
    (grad_w,) = torch.autograd.grad(logp.sum(), [weight])
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref_logp, _ = reference_logprobs_entropy(h32, w32, targets)
    (ref_w,) = torch.autograd.grad(ref_logp.sum(), [w32])
    assert grad_w.dtype == torch.bfloat16
    assert (grad_w.float() - ref_w).abs().max() <= ref_w.abs().max() * 2**-6
