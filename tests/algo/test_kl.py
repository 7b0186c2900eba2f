"""KL estimators against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from miles_core.algo import kl_estimate, should_update_reference

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


def test_unbiased_kl_weights_by_importance_ratio():
    # rho = [2, .5]: k1 [.5, -1] -> [1, -.5]; k2 [.125, .5] -> [.25, .25]
    rho = torch.tensor([2.0, 0.5])
    assert kl_estimate(LOGP, REF, "k1", importance_ratio=rho).tolist() == [1.0, -0.5]
    assert kl_estimate(LOGP, REF, "k2", importance_ratio=rho).tolist() == [0.25, 0.25]
    # low_var_kl clamps the weighted value: k3 at log ratio -15 is 3269001.4, times .5, clamped to 10;
    # at log ratio .5 it is .10653, times 2 = .21306 (inside the bounds)
    out = kl_estimate(torch.tensor([-16.0, -1.0]), torch.tensor([-1.0, -1.5]), "low_var_kl",
                      importance_ratio=torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(out, torch.tensor([10.0, 2 * (math.exp(-0.5) - 0.5)]))


def test_should_update_reference():
    # interval 3: after rollout steps 2, 5, 8 (0-based); 0 never
    assert [s for s in range(9) if should_update_reference(s, 3)] == [2, 5, 8]
    assert not any(should_update_reference(s, 0) for s in range(9))
