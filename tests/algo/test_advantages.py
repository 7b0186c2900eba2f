"""Advantage estimators against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from miles_core.algo import ADVANTAGE_ESTIMATORS, broadcast_to_tokens, compute_advantages, group_advantages


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


@pytest.mark.parametrize("name", ["grpo", "dr_grpo"])
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
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo"}
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
