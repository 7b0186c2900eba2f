"""TIS / MIS / rejection sampling / veto / batch normalisation / IcePop against hand-computed weights."""

from __future__ import annotations

import math

import pytest
import torch

from miles_core.algo import correction_weights, is_weights, tis_batch_mean
from miles_core.config import AlgoConfig

# Token ratios rho = exp(old_logp - rollout_logp): row 0 [1, 3, .25]; row 1 [.5, 2, padding 1e-6].
# Sequence weights: row 0 1 * 3 * .25 = .75, row 1 .5 * 2 = 1.
# Geometric weights: row 0 .75^(1/3) = .90856, row 1 1.
RHO = torch.tensor([[1.0, 3.0, 0.25], [0.5, 2.0, 1e-6]], dtype=torch.float64)
OLD = RHO.log()
ROLLOUT = torch.zeros(2, 3, dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
G = 0.75 ** (1 / 3)
TRUNCATED = torch.tensor([[1.0, 2.0, 0.25], [0.5, 2.0, 0.0]], dtype=torch.float64)  # token level, min(rho, 2)

CASES = [
    # level, mode, lo, hi, weights (trained tokens), keep
    ("token", "truncate", 0.5, 2.0, [[1, 2, 0.25], [0.5, 2, 0]], [[1, 1, 1], [1, 1, 0]]),  # min(rho, 2)
    ("token", "clip", 0.5, 2.0, [[1, 2, 0.5], [0.5, 2, 0]], [[1, 1, 1], [1, 1, 0]]),  # clamp(rho, .5, 2)
    ("token", "mask", 0.5, 2.0, [[1, 3, 0.25], [0.5, 2, 0]], [[1, 0, 0], [1, 1, 0]]),  # 3 and .25 rejected
    ("sequence", "truncate", 0.5, 0.9, [[0.75] * 3, [0.9, 0.9, 0]], [[1, 1, 1], [1, 1, 0]]),  # min(1, .9)
    ("sequence", "clip", 0.8, 2.0, [[0.8] * 3, [1, 1, 0]], [[1, 1, 1], [1, 1, 0]]),  # max(.75, .8)
    ("sequence", "mask", 0.8, 2.0, [[0.75] * 3, [1, 1, 0]], [[0, 0, 0], [1, 1, 0]]),  # .75 < .8: row 0 out
    ("geometric", "truncate", 0.5, 0.95, [[G] * 3, [0.95, 0.95, 0]], [[1, 1, 1], [1, 1, 0]]),
    ("geometric", "clip", 0.95, 1.05, [[0.95] * 3, [1, 1, 0]], [[1, 1, 1], [1, 1, 0]]),
    ("geometric", "mask", 0.95, 1.05, [[G] * 3, [1, 1, 0]], [[0, 0, 0], [1, 1, 0]]),  # .90856 < .95
]


def _weights(**cfg):
    return is_weights(AlgoConfig(**cfg), old_log_probs=OLD, rollout_log_probs=ROLLOUT, loss_mask=MASK)


@pytest.mark.parametrize("level, mode, lo, hi, weights, keep", CASES)
def test_levels_and_modes(level, mode, lo, hi, weights, keep):
    w, k, stats = _weights(use_tis=True, tis_level=level, tis_mode=mode, tis_clip_low=lo, tis_clip_high=hi)
    torch.testing.assert_close(w * MASK, torch.tensor(weights, dtype=torch.float64))
    assert (k * MASK).tolist() == torch.tensor(keep, dtype=torch.float64).tolist()
    assert stats["tis_masked_frac"].mul(MASK).sum().item() == MASK.sum().item() - sum(map(sum, keep))


def test_truncate_stats():
    # rho 3 is cut to 2: clip fraction marks that token only; stats["tis"] is the raw ratio
    _, _, stats = _weights(use_tis=True, tis_clip_high=2.0)
    assert (stats["tis_clipfrac"] * MASK).tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(stats["tis"] * MASK, RHO * MASK)


def test_icepop_is_token_level_mask_mode():
    # IcePop (Ring-1T): keep rho where .5 <= rho <= 5, else 0 -> row 0 [1, 3, 0], row 1 [.5, 2]
    cfg = AlgoConfig(use_tis=True, tis_level="token", tis_mode="mask", tis_clip_low=0.5, tis_clip_high=5.0)
    multiplier, _ = correction_weights(cfg, old_log_probs=OLD, rollout_log_probs=ROLLOUT, loss_mask=MASK)
    icepop = torch.where((RHO >= 0.5) & (RHO <= 5.0), RHO, torch.zeros_like(RHO))
    torch.testing.assert_close(multiplier * MASK, icepop * MASK)
    torch.testing.assert_close(multiplier * MASK, torch.tensor([[1.0, 3.0, 0.0], [0.5, 2.0, 0.0]], dtype=torch.float64))


def test_veto_drops_rows_with_a_catastrophic_token():
    # threshold .3: row 0 has rho .25 < .3 -> the whole row is rejected; row 1's 1e-6 is padding -> kept
    w, keep, stats = _weights(use_tis=True, tis_clip_high=2.0, tis_veto_threshold=0.3)
    assert (keep * MASK).tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    assert (stats["tis_veto_frac"] * MASK).tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(w * MASK, TRUNCATED)  # the weights themselves are unchanged


def test_rejection_sampling_is_independent_of_tis():
    # TIS token truncate at 2, RS geometric in [.95, 1.05]: row 0 (.90856) rejected, weights stay token-level
    w, keep, _ = _weights(use_tis=True, tis_clip_high=2.0, use_rs=True, rs_level="geometric",
                          rs_clip_low=0.95, rs_clip_high=1.05)
    assert (keep * MASK).tolist() == [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    torch.testing.assert_close(w * MASK, TRUNCATED)
    # RS alone: weights 1, only the rejection (token level [.5, 2]: 3 and .25 out)
    w, keep, _ = _weights(use_rs=True, rs_clip_low=0.5, rs_clip_high=2.0)
    assert (w * MASK).tolist() == MASK.tolist()
    assert (keep * MASK).tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]


@pytest.mark.parametrize("cfg, mean", [
    # token, truncate at 2: (1 + 2 + .25 + .5 + 2) / 5 tokens = 1.15
    (dict(use_tis=True, tis_clip_high=2.0), 1.15),
    # sequence, truncate at 2: (.75 + 1) / 2 sequences = .875
    (dict(use_tis=True, tis_level="sequence", tis_clip_high=2.0), 0.875),
    # token, mask [.5, 2]: the mean is over the bounded weights before rejection: (1 + 3 + .25 + .5 + 2) / 5 = 1.35
    (dict(use_tis=True, tis_mode="mask", tis_clip_low=0.5, tis_clip_high=2.0), 1.35),
])
def test_batch_mean(cfg, mean):
    cfg = AlgoConfig(**cfg, tis_batch_normalize=True)
    assert tis_batch_mean(cfg, old_log_probs=OLD, rollout_log_probs=ROLLOUT, loss_mask=MASK) == pytest.approx(mean)


def test_batch_normalisation_divides_weights():
    # token truncate at 2, mean 1.15: multiplier = [1, 2, .25, .5, 2] / 1.15
    cfg = AlgoConfig(use_tis=True, tis_clip_high=2.0, tis_batch_normalize=True)
    multiplier, stats = correction_weights(cfg, old_log_probs=OLD, rollout_log_probs=ROLLOUT, loss_mask=MASK,
                                           batch_mean=1.15)
    expected = torch.tensor([[1.0, 2.0, 0.25], [0.5, 2.0, 0.0]], dtype=torch.float64) / 1.15
    torch.testing.assert_close(multiplier * MASK, expected)
    assert torch.equal(stats["tis_weight"], multiplier) and not multiplier.requires_grad
    with pytest.raises(ValueError, match="tis_batch_normalize is set but tis_batch_mean was not given"):
        correction_weights(cfg, old_log_probs=OLD, rollout_log_probs=ROLLOUT, loss_mask=MASK)


def test_log_weights_are_clamped_before_exp():
    # sequence log-ratio 3 * 10 = 30 is clamped to 20: weight e^20 before truncation, no inf
    old = torch.full((1, 3), 10.0, dtype=torch.float64)
    _, _, stats = is_weights(AlgoConfig(use_tis=True, tis_level="sequence"), old_log_probs=old,
                             rollout_log_probs=torch.zeros(1, 3, dtype=torch.float64), loss_mask=torch.ones(1, 3))
    assert stats["tis"][0, 0].item() == pytest.approx(math.exp(20))


def test_sequence_batch_mean_counts_an_all_masked_row_as_zero():
    # Issue 19, case 3. B=2, T=2; row 1 old - rollout = [.1, .1] -> sequence weight e^.2 = 1.2214
    # (below the truncation at 2); row 2 all masked -> weight 0 in the mean, as slime's
    # per-sample mean counts it. Batch mean (1.2214 + 0) / 2 = .6107; row 1's effective
    # weight 1.2214 / .6107 = 2.0 (before the fix row 2 was left out: mean 1.2214, weight 1.0).
    cfg = AlgoConfig(use_tis=True, tis_level="sequence", tis_mode="truncate", tis_clip_high=2.0,
                     tis_batch_normalize=True)
    old = torch.tensor([[0.1, 0.1], [0.0, 0.0]])
    rollout = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mean = tis_batch_mean(cfg, old_log_probs=old, rollout_log_probs=rollout, loss_mask=mask)
    assert mean == pytest.approx(math.exp(0.2) / 2)
    multiplier, _ = correction_weights(cfg, old_log_probs=old, rollout_log_probs=rollout, loss_mask=mask,
                                       batch_mean=mean)
    torch.testing.assert_close(multiplier[0], torch.tensor([2.0, 2.0]))
