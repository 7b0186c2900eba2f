"""Advantage estimators against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from miles_core.algo import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    compute_advantages,
    estimate_advantages,
    group_advantages,
    normalize_advantages,
)
from miles_core.config import AlgoConfig


def test_grpo_two_groups_of_two():
    # groups [1, 0] and [0, 1]: mean .5, unbiased std sqrt((.25 + .25) / 1) = .70711
    # -> (1 - .5) / (.70711 + 1e-6) = +.70711, (0 - .5) / ... = -.70711
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2, normalize_std=True)
    torch.testing.assert_close(adv, torch.tensor([0.70711, -0.70711, -0.70711, 0.70711]), atol=1e-5, rtol=0)


def test_grpo_uses_unbiased_std():
    # group [1, 0, 0]: mean 1/3, deviations (2/3, -1/3, -1/3),
    # unbiased var = (4/9 + 1/9 + 1/9) / (3 - 1) = 1/3, std = .57735
    # -> (2/3) / .57735 = 1.15470, (-1/3) / .57735 = -.57735
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0]), 3, normalize_std=True)
    torch.testing.assert_close(adv, torch.tensor([1.15470, -0.57735, -0.57735]), atol=1e-5, rtol=0)


def test_dr_grpo_only_centres():
    # groups [1, 0], [0, 1], mean .5 -> r - .5
    adv = compute_advantages("dr_grpo", torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_equal_rewards_give_zero_not_nan():
    # std 0 -> 0 / (0 + 1e-6) = 0
    adv = compute_advantages("grpo", torch.tensor([3.0, 3.0, 1.0, 0.0]), 2)
    assert adv[:2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "gspo", "rloo"])
def test_group_size_one_gives_zero(name):
    adv = compute_advantages(name, torch.tensor([1.0, 0.0, 5.0]), 1)
    assert adv.tolist() == [0.0, 0.0, 0.0]


def test_integer_rewards_become_float():
    adv = compute_advantages("dr_grpo", torch.tensor([1, 0]), 2)
    assert adv.dtype == torch.float32 and adv.tolist() == [0.5, -0.5]


def test_bad_group_size():
    with pytest.raises(ValueError, match=r"number of rewards \(5\) is not a multiple of group_size \(2\)"):
        group_advantages(torch.zeros(5), 2, normalize_std=True)
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        group_advantages(torch.zeros(4), 0, normalize_std=True)


def test_registry_and_unknown_name():
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "gspo", "rloo", "reinforce_plus_plus",
                                         "reinforce_plus_plus_baseline", "ppo"}
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.equal(compute_advantages("grpo", rewards, 2), group_advantages(rewards, 2, normalize_std=True))
    with pytest.raises(ValueError, match="unknown advantage estimator 'grpoo' \\(did you mean 'grpo'\\?\\)"):
        compute_advantages("grpoo", rewards, 2)


def test_estimators_ignore_inputs_they_do_not_use():
    # Callers pass every per-token tensor they hold; GRPO needs none of them.
    mask = torch.ones(2, 3)
    adv = compute_advantages("dr_grpo", torch.tensor([1.0, 0.0]), 2, loss_mask=mask)
    assert adv.tolist() == [0.5, -0.5]


def test_broadcast_to_tokens():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert broadcast_to_tokens(per_token, mask).tolist() == [[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match=r"expected \(N,\) or \(N, T\)"):
        broadcast_to_tokens(torch.zeros(3), mask)


def test_gspo_advantage_is_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.equal(compute_advantages("gspo", rewards, 2), compute_advantages("grpo", rewards, 2))


def test_rloo_leave_one_out():
    # group [3, 1, 2]: 3 - (1 + 2) / 2 = 1.5; 1 - (3 + 2) / 2 = -1.5; 2 - (3 + 1) / 2 = 0
    # (equivalently G / (G - 1) * (r - mean) = 1.5 * [1, -1, 0])
    assert compute_advantages("rloo", torch.tensor([3.0, 1.0, 2.0]), 3).tolist() == [1.5, -1.5, 0.0]


def test_normalize_advantages_masked_whitening():
    # trained values [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], unbiased var (4 + 1 + 0 + 9) / 3 = 14 / 3,
    # std 2.16025 -> [-.92582, -.46291, 0, 1.38873]; the masked 100 is ignored and comes out 0
    adv = torch.tensor([[1.0, 2.0, 100.0], [3.0, 6.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    out = normalize_advantages(adv, mask)
    torch.testing.assert_close(out, torch.tensor([[-0.92582, -0.46291, 0.0], [0.0, 1.38873, 0.0]]), atol=1e-5, rtol=0)
    assert normalize_advantages(adv, torch.zeros(2, 3)).abs().sum() == 0  # no trained token: zeros, not NaN


# Two responses, T = 3, the second one token shorter. Token KL [[.5, 0, -.5], [1, 1, pad 9]].
RPP_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
RPP_KL = torch.tensor([[0.5, 0.0, -0.5], [1.0, 1.0, 9.0]])


def test_reinforce_plus_plus():
    # kl_coef .1, gamma .5, rewards [1, 0] on each row's last trained token:
    #   row 0 token rewards [-.05, 0, .05 + 1] -> returns G2 = 1.05, G1 = .5 * 1.05 = .525,
    #         G0 = -.05 + .5 * .525 = .2125
    #   row 1 token rewards [-.1, -.1, (pad)] -> G1 = -.1, G0 = -.1 + .5 * -.1 = -.15
    # whitened over the 5 tokens: mean .3075, unbiased var .98300 / 4 = .24575, std .49573
    #   -> (.2125 - .3075) / .49573 = -.19164, .43875, 1.49779, -.92288, -.82202
    adv = compute_advantages("reinforce_plus_plus", torch.tensor([1.0, 0.0]), 1, loss_mask=RPP_MASK,
                             token_kl=RPP_KL, kl_coef=0.1, gamma=0.5)
    expected = torch.tensor([[-0.19164, 0.43875, 1.49779], [-0.92288, -0.82202, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_reinforce_plus_plus_baseline():
    # group [1, 0] -> centred [.5, -.5]; minus .1 * kl:
    #   row 0 [.5 - .05, .5, .5 + .05] = [.45, .5, .55], row 1 [-.6, -.6]
    # whitened: mean .06, unbiased var 1.457 / 4 = .36425, std .60353
    #   -> [.64620, .72904, .81189], [-1.09356, -1.09356]
    adv = compute_advantages("reinforce_plus_plus_baseline", torch.tensor([1.0, 0.0]), 2, loss_mask=RPP_MASK,
                             token_kl=RPP_KL, kl_coef=0.1)
    expected = torch.tensor([[0.64620, 0.72904, 0.81189], [-1.09356, -1.09356, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_ppo_gae_estimator():
    # values [.5, .4, .2], reward 1 on the last token, gamma .9, lambd .5:
    #   deltas: t2 1 + 0 - .2 = .8; t1 .9 * .2 - .4 = -.22; t0 .9 * .4 - .5 = -.14
    #   A (discount .45): A2 = .8, A1 = -.22 + .45 * .8 = .14, A0 = -.14 + .45 * .14 = -.077
    values = torch.tensor([[0.5, 0.4, 0.2]])
    adv = compute_advantages("ppo", torch.tensor([1.0]), 1, loss_mask=torch.ones(1, 3), values=values,
                             gamma=0.9, lambd=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.077, 0.14, 0.8]]))


@pytest.mark.parametrize("name, inputs, missing", [
    ("ppo", {"loss_mask": torch.ones(1, 2)}, "values"),
    ("ppo", {"values": torch.ones(1, 2)}, "loss_mask"),
    ("reinforce_plus_plus", {}, "loss_mask"),
    ("reinforce_plus_plus_baseline", {"loss_mask": torch.ones(1, 2), "kl_coef": 0.1}, "token_kl"),
])
def test_missing_inputs_are_named(name, inputs, missing):
    with pytest.raises(ValueError, match=f"advantage estimator '{name}' needs input '{missing}'"):
        compute_advantages(name, torch.tensor([1.0]), 1, **inputs)


def test_estimate_advantages_grpo_matches_loop_path():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv, returns = estimate_advantages(AlgoConfig(), torch.tensor([1.0, 0.0]), 2, loss_mask=mask)
    # grpo [.70711, -.70711] broadcast over trained tokens
    torch.testing.assert_close(adv, torch.tensor([[0.70711, 0.70711], [-0.70711, 0.0]]), atol=1e-5, rtol=0)
    assert returns is None


def test_estimate_advantages_ppo_kl_reward_and_returns():
    # kl_coef .5 with k1 (logp - ref): per-token KL [.2, 0, -.4] -> token rewards [-.1, 0, .2 + 1]
    # gamma = lambd = 1, values [.5, .4, .2]: A_t = sum_{s >= t} r_s - V_t
    #   A = [1.1 - .5, 1.2 - .4, 1.2 - .2] = [.6, .8, 1.0]; returns = A + V = [1.1, 1.2, 1.2]
    cfg = AlgoConfig(advantage_estimator="ppo", kl_coef=0.5, kl_loss_type="k1")
    values = torch.tensor([[0.5, 0.4, 0.2]])
    adv, returns = estimate_advantages(cfg, torch.tensor([1.0]), 1, loss_mask=torch.ones(1, 3), values=values,
                                       log_probs=torch.tensor([[-1.0, -1.0, -1.0]]),
                                       ref_log_probs=torch.tensor([[-1.2, -1.0, -0.6]]))
    torch.testing.assert_close(adv, torch.tensor([[0.6, 0.8, 1.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.1, 1.2, 1.2]]))


def test_estimate_advantages_normalizes_after_taking_returns():
    # no KL, gamma = lambd = 1: A = 1 - V = [.5, .6, .8], returns = 1
    # whitened: mean .63333, deviations [-.13333, -.03333, .16667], unbiased var .046667 / 2 = .023333,
    # std .15275 -> [-.87287, -.21822, 1.09109]; returns keep the raw GAE targets
    cfg = AlgoConfig(advantage_estimator="ppo", normalize_advantages=True)
    adv, returns = estimate_advantages(cfg, torch.tensor([1.0]), 1, loss_mask=torch.ones(1, 3),
                                       values=torch.tensor([[0.5, 0.4, 0.2]]))
    torch.testing.assert_close(adv, torch.tensor([[-0.87287, -0.21822, 1.09109]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(returns, torch.ones(1, 3))


def test_estimate_advantages_kl_reward_needs_log_probs():
    cfg = AlgoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef is 0.1: pass log_probs and ref_log_probs"):
        estimate_advantages(cfg, torch.tensor([1.0]), 1, loss_mask=torch.ones(1, 2))


@pytest.mark.parametrize("name", ["reinforce_plus_plus", "reinforce_plus_plus_baseline"])
def test_reinforce_plus_plus_is_whitened_once_with_normalize_advantages(name):
    # Issue 19, case 2. Group size 1, rewards [1, 1], one token each; k1 KL = logp - ref =
    # [.001, .002], kl_coef .01 -> returns [1 - 1e-5, 1 - 2e-5] (baseline: [-1e-5, -2e-5]).
    # One whitening: deviations +-5e-6, unbiased var 2 * 25e-12 / 1 = 5e-11,
    # (+-5e-6) / sqrt(5e-11 + 1e-8) = +-.049875 (slime). A second whitening (the bug) rescaled
    # these to unit variance: +-1 / sqrt(2) = +-.70711.
    cfg = AlgoConfig(advantage_estimator=name, normalize_advantages=True, kl_coef=0.01, kl_loss_type="k1")
    adv, _ = estimate_advantages(cfg, torch.tensor([1.0, 1.0]), 1, loss_mask=torch.ones(2, 1),
                                 log_probs=torch.tensor([[-1.0], [-1.0]]),
                                 ref_log_probs=torch.tensor([[-1.001], [-1.002]]))
    torch.testing.assert_close(adv, torch.tensor([[0.049875], [-0.049875]]), atol=2e-4, rtol=0)


@pytest.mark.parametrize("big", [3e38, 1e300])
def test_grpo_advantages_of_huge_float64_rewards(big):
    # group (0, big): mean big/2, centred -+big/2, unbiased std = sqrt(2 (big/2)^2 / 1) = big/2 * sqrt(2)
    # -> A = -+1/sqrt(2). 3e38 overflows float32 sums; 1e300 squared overflows even float64.
    rewards = torch.tensor([0.0, big, big, big], dtype=torch.float64)
    advantages = group_advantages(rewards, 2, normalize_std=True)
    torch.testing.assert_close(advantages, torch.tensor([-0.5**0.5, 0.5**0.5, 0.0, 0.0], dtype=torch.float64))
