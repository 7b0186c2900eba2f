"""Chunked discounted returns and GAE against hand-computed numbers and a plain serial loop."""

from __future__ import annotations

import pytest
import torch

from miles_core.algo import discounted_returns, gae


def serial_gae(rewards, values, mask, gamma, lambd):
    """The textbook backward loop over each row's trained tokens (Python floats)."""
    advantages = [[0.0] * len(row) for row in rewards]
    for b, (r, v, m) in enumerate(zip(rewards, values, mask)):
        last, next_value = 0.0, 0.0
        for t in reversed([t for t, keep in enumerate(m) if keep > 0]):
            delta = r[t] + gamma * next_value - v[t]
            last = delta + gamma * lambd * last
            advantages[b][t], next_value = last, v[t]
    return advantages


def test_gae_hand_computed():
    # rewards [0, 0, 1], values [.5, .4, .2], gamma .9, lambd .5:
    #   deltas t2: 1 - .2 = .8; t1: .9 * .2 - .4 = -.22; t0: .9 * .4 - .5 = -.14
    #   A2 = .8, A1 = -.22 + .45 * .8 = .14, A0 = -.14 + .45 * .14 = -.077
    #   returns = A + V = [.423, .54, 1.0]
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.4, 0.2]]), torch.ones(1, 3),
                   gamma=0.9, lambd=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.077, 0.14, 0.8]]))
    torch.testing.assert_close(ret, torch.tensor([[0.423, 0.54, 1.0]]))


def test_gae_skips_masked_tokens_and_padding():
    # mask [1, 0, 1, 0(pad)]: steps are t0 and t2; t1 (tool output) neither receives nor passes value,
    # its reward 5 is ignored. gamma = lambd = 1, values [.5, 9, .25, 9], reward 1 at t2:
    #   A2 = 1 - .25 = .75 (bootstraps 0 after the last step, not the padding's 9)
    #   A0 = (0 + V2 - V0) + A2 = (.25 - .5) + .75 = .5; masked positions 0
    adv, ret = gae(torch.tensor([[0.0, 5.0, 1.0, 0.0]]), torch.tensor([[0.5, 9.0, 0.25, 9.0]]),
                   torch.tensor([[1.0, 0.0, 1.0, 0.0]]), gamma=1.0, lambd=1.0)
    assert adv.tolist() == [[0.5, 0.0, 0.75, 0.0]]
    assert ret.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_discounted_returns_hand_computed():
    # gamma .5, rewards [1, 2, 4]: R2 = 4, R1 = 2 + 2 = 4, R0 = 1 + 2 = 3
    assert discounted_returns(torch.tensor([[1.0, 2.0, 4.0]]), 0.5).tolist() == [[3.0, 4.0, 4.0]]
    # gamma 0: the returns are the rewards
    assert discounted_returns(torch.tensor([[1.0, 2.0, 4.0]]), 0.0).tolist() == [[1.0, 2.0, 4.0]]
    # mask [1, 0, 1]: the masked token is not a step: R2 = 4, R0 = 1 + .5 * 4 = 3, R1 = 0
    out = discounted_returns(torch.tensor([[1.0, 2.0, 4.0]]), 0.5, torch.tensor([[1.0, 0.0, 1.0]]))
    assert out.tolist() == [[3.0, 0.0, 4.0]]


TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [1, 127, 128, 129, 1000])
def test_chunked_gae_matches_serial_loop(length, dtype):
    gen = torch.Generator().manual_seed(length)
    rewards = torch.randn(3, length, generator=gen, dtype=torch.float64)
    values = torch.randn(3, length, generator=gen, dtype=torch.float64)
    mask = (torch.rand(3, length, generator=gen) > 0.2).double()  # interior holes
    mask[1, length // 2 + 1:] = 0  # right padding
    mask[2, 0] = 1
    expected = torch.tensor(serial_gae(rewards.tolist(), values.tolist(), mask.tolist(), 0.99, 0.95), dtype=dtype)
    adv, ret = gae(rewards.to(dtype), values.to(dtype), mask.to(dtype), gamma=0.99, lambd=0.95)
    tol = TOLERANCES[dtype]
    assert adv.dtype == dtype
    torch.testing.assert_close(adv, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(ret, (expected + values.to(dtype)) * mask.to(dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize("length", [1, 129, 1000])
def test_chunked_returns_match_serial_loop(length):
    # discounted returns are GAE with values 0 and lambd 1
    gen = torch.Generator().manual_seed(length)
    rewards = torch.randn(2, length, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, length, dtype=torch.float64)
    mask[1, length // 3 + 1:] = 0
    expected = serial_gae(rewards.tolist(), [[0.0] * length] * 2, mask.tolist(), 0.97, 1.0)
    out = discounted_returns(rewards, 0.97, mask)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), gamma=1.5, lambd=1.0)
    with pytest.raises(ValueError, match=r"expected \(B, T\) tensors of one shape"):
        gae(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2), gamma=1.0, lambd=1.0)
