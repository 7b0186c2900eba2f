"""pass@k and mean@k estimators and the per-dataset aggregate, against hand-computed numbers."""

from __future__ import annotations

import itertools
import math

import pytest

from miles_core.rl.eval import group_metrics, k_values, mean_at_k, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 1, 0.25),        # 1 - C(3,1)/C(4,1) = 1 - 3/4
    (4, 1, 2, 0.5),         # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (4, 2, 2, 5 / 6),       # 1 - C(2,2)/C(4,2) = 1 - 1/6
    (4, 3, 2, 1.0),         # n - c = 1 < k: every pair holds a correct sample
    (5, 2, 3, 0.9),         # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (10, 3, 5, 11 / 12),    # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 1 - 1/12
    (8, 0, 8, 0.0),         # nothing correct: C(8,8)/C(8,8) = 1
    (8, 8, 1, 1.0),         # everything correct
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct():
    for n in range(1, 9):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)  # 1 - (n-c)/n


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_correct_sample(n):
    # The estimator is exact over all k-subsets of the n samples (why it is unbiased).
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))


def test_pass_at_k_stays_finite_for_large_n():
    # C(1000, 500) ~ 2.7e299: exact integer binomials, no float overflow.
    assert math.isclose(pass_at_k(1000, 1, 500), 0.5)  # 1 - C(999,500)/C(1000,500) = 1 - 500/1000


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_mean_at_k_is_the_mean_over_all_k_subsets():
    rewards = [1.0, 0.0, 0.5]
    # k=2 subsets: {1, 0} -> 0.5, {1, 0.5} -> 0.75, {0, 0.5} -> 0.25; their mean is 0.5 = mean of all 3.
    assert mean_at_k(rewards, 2) == pytest.approx((0.5 + 0.75 + 0.25) / 3)
    assert mean_at_k(rewards, 1) == mean_at_k(rewards, 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="mean@k needs"):
        mean_at_k(rewards, 4)


@pytest.mark.parametrize("n, expected", [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (4, [1, 2, 4]),
                                         (8, [1, 2, 4, 8]), (12, [1, 2, 4, 8, 12])])
def test_k_values_are_powers_of_two_and_n(n, expected):
    assert k_values(n) == expected


def test_group_metrics_of_two_prompts():
    rewards = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    metrics = group_metrics(rewards, correct_threshold=1.0)
    assert metrics == pytest.approx({
        "reward": 3 / 8,                    # 3 ones out of 8 samples
        "accuracy": 3 / 8,
        "pass@1": (1 / 4 + 2 / 4) / 2,      # c/n per prompt: 0.375
        "pass@2": (1 / 2 + 5 / 6) / 2,      # (1 - C(3,2)/C(4,2)) and (1 - C(2,2)/C(4,2)): 2/3
        "pass@4": 1.0,                      # both prompts have a correct sample
        "mean@4": (1 / 4 + 2 / 4) / 2,
    })
    assert list(metrics) == ["reward", "accuracy", "pass@1", "pass@2", "pass@4", "mean@4"]


def test_group_metrics_counts_correct_by_threshold():
    # Partial rewards (e.g. f1): reward is the mean, accuracy counts rewards >= the threshold.
    metrics = group_metrics([[0.6, 0.4], [0.5, 0.0]], correct_threshold=0.5)
    assert metrics["reward"] == pytest.approx((0.6 + 0.4 + 0.5 + 0.0) / 4)
    assert metrics["accuracy"] == pytest.approx(2 / 4)  # 0.6 and 0.5
    assert metrics["pass@2"] == 1.0
    assert group_metrics([[0.6, 0.4]], correct_threshold=1.0)["accuracy"] == 0.0


def test_group_metrics_needs_equal_groups():
    with pytest.raises(ValueError, match="same non-zero number of samples"):
        group_metrics([[1.0, 0.0], [1.0]], correct_threshold=1.0)
