"""KL estimators against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from miles_core.algo import kl_estimate

# log_ratio = logp - ref = [0.5, -1.0]
LOGP = torch.tensor([-1.0, -2.0])
REF = torch.tensor([-1.5, -1.0])


def test_k1():
    assert kl_estimate(LOGP, REF, "k1").tolist() == [0.5, -1.0]


def test_k2():
    # 0.5 * 0.5^2 = 0.125; 0.5 * (-1)^2 = 0.5
    assert kl_estimate(LOGP, REF, "k2").tolist() == [0.125, 0.5]


@pytest.mark.parametrize("kind", ["k3", "low_var_kl"])
def test_k3_and_low_var_kl_inside_bounds(kind):
    # ref - logp = [-0.5, 1.0]
    # exp(-0.5) + 0.5 - 1 = 0.60653 - 0.5 = 0.10653; exp(1) - 1 - 1 = 0.71828
    expected = torch.tensor([math.exp(-0.5) - 0.5, math.e - 2.0])
    torch.testing.assert_close(kl_estimate(LOGP, REF, kind), expected)


def test_low_var_kl_clamps_where_k3_does_not():
    # log_ratio -15: k3 = exp(15) - 15 - 1 = 3269001.4 -> clamped to 10
    # log_ratio +15: k3 = exp(-15) + 15 - 1 = 14.0000003 -> clamped to 10
    logp = torch.tensor([-16.0, 0.0])
    ref = torch.tensor([-1.0, -15.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([math.exp(15) - 16, 14.0 + math.exp(-15)]))
    assert kl_estimate(logp, ref, "low_var_kl").tolist() == [10.0, 10.0]


def test_low_var_kl_gradient_finite_when_exp_would_overflow():
    # ref - logp = 100: exp(100) overflows float32, so the log ratio is clamped to 20 first;
    # the clamped output then has zero gradient instead of 0 * inf = NaN.
    logp = torch.tensor([-101.0], requires_grad=True)
    kl = kl_estimate(logp, torch.tensor([-1.0]), "low_var_kl")
    kl.sum().backward()
    assert kl.item() == 10.0 and logp.grad.item() == 0.0


def test_k3_gradient():
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = -exp(ref - logp) + 1
    # ref - logp = -0.5 -> 1 - 0.60653 = 0.39347
    logp = torch.tensor([-1.0], requires_grad=True)
    kl_estimate(logp, torch.tensor([-1.5]), "k3").sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([1 - math.exp(-0.5)]))


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(LOGP, REF, "k4")
