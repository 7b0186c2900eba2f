"""DAPO dynamic sampling, over-sampling accounting and overlong reward shaping."""

from __future__ import annotations

import pytest
import torch

from miles_core.algo import (
    DynamicSamplingTally,
    dynamic_sampling_keep,
    keep_groups,
    overlong_penalty,
    post_process_rewards,
    round_size,
)
from miles_core.config import AlgoConfig


def test_dynamic_sampling_drops_groups_whose_rewards_agree():
    # groups of 2: [1, 1] std 0 -> drop; [0, 1] std .70711 -> keep; [0, 0] -> drop;
    # [.5, .5 + 1e-7] std 7.1e-8 <= 1e-6 -> drop (float noise is not a learning signal)
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5 + 1e-7], dtype=torch.float64)
    assert dynamic_sampling_keep(rewards, 2).tolist() == [False, True, False, False]
    # a group of one has no spread: dropped
    assert dynamic_sampling_keep(torch.tensor([1.0, 0.0]), 1).tolist() == [False, False]
    assert torch.equal(keep_groups(AlgoConfig(dynamic_sampling=True), rewards, 2), dynamic_sampling_keep(rewards, 2))
    with pytest.raises(ValueError, match=r"expected \(N,\) rewards in groups of 2, got shape \(3,\)"):
        dynamic_sampling_keep(torch.zeros(3), 2)


def test_tally_rounds_and_metrics():
    # round 1 keeps 2 of 3 groups, round 2 keeps 1 of 2: 5 generated, 3 kept, 2 dropped
    tally = DynamicSamplingTally().add(torch.tensor([True, False, True])).add(torch.tensor([False, True]))
    assert (tally.num_rounds, tally.num_generated, tally.num_kept) == (2, 5, 3)
    assert tally.done(target=3, max_rounds=4)  # enough kept
    assert not tally.done(target=4, max_rounds=3)  # one more round allowed
    assert tally.done(target=4, max_rounds=2)  # cap reached: train on 3 groups
    assert tally.metrics(target=4) == {
        "rollout/dynamic_sampling_rounds": 2.0,
        "rollout/dynamic_sampling_generated_groups": 5.0,
        "rollout/dynamic_sampling_dropped_groups": 2.0,
        "rollout/dynamic_sampling_drop_ratio": 0.4,  # 2 / 5
        "rollout/dynamic_sampling_shortfall_groups": 1.0,  # 4 - 3
    }
    assert round_size(AlgoConfig(), 8) == 8 and round_size(AlgoConfig(over_sampling_batch_size=12), 8) == 12


def test_overlong_penalty():
    # L_max 20, buffer 4 -> ramp starts after 16: L 10, 16 -> 0; 17 -> -1/4; 18 -> -2/4; 20 -> -1; 25 -> -1 (capped)
    lengths = torch.tensor([10, 16, 17, 18, 20, 25])
    assert overlong_penalty(lengths, 20, 4, 1.0).tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, 20, 4, 0.5).tolist() == [0.0, 0.0, -0.125, -0.25, -0.5, -0.5]
    assert overlong_penalty(lengths, 20, 0, 1.0).tolist() == [0.0] * 6
    with pytest.raises(ValueError, match=r"overlong buffer_len must be in \[0, max_len = 20\], got 21"):
        overlong_penalty(lengths, 20, 21, 1.0)


def test_post_process_rewards_adds_overlong_penalty():
    # rewards [1, 1] with lengths [16, 18] of 20, buffer 4: [1 + 0, 1 - .5]
    cfg = AlgoConfig(overlong_buffer_len=4)
    out = post_process_rewards(cfg, torch.tensor([1, 1]), 2, response_lengths=torch.tensor([16, 18]),
                               max_response_len=20)
    assert out.tolist() == [1.0, 0.5]
    assert post_process_rewards(AlgoConfig(), torch.tensor([1, 0]), 2, response_lengths=torch.tensor([20, 20]),
                                max_response_len=20).tolist() == [1.0, 0.0]
