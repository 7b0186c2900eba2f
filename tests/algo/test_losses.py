"""PPO clip loss, aggregation and `policy_loss` against hand-computed numbers, plus the
micro-batch property: global denominators make micro-batch losses and gradients sum exactly."""

from __future__ import annotations

import math

import pytest
import torch

from miles_core.algo import aggregate, policy_loss, ppo_clip_loss
from miles_core.config import AlgoConfig

E = math.exp


def _ppo(log_ratio, adv, **clip):
    logp = torch.tensor(log_ratio, requires_grad=True)
    loss, stats = ppo_clip_loss(logp, torch.zeros(len(log_ratio)), torch.tensor(adv), **clip)
    return logp, loss, stats


def test_ppo_clip_branches():
    # eps .2: ratio bounds [0.8, 1.2]
    # t0 A=+1 ratio e^.1 = 1.10517 inside          -> -1.10517, not clipped
    # t1 A=+1 ratio e^.2 = 1.22140 > 1.2           -> max(-1.2214, -1.2) = -1.2, clipped
    # t2 A=-1 ratio e^-.5 = .60653 < .8            -> max(.60653, .8) = .8, clipped
    # t3 A=+1 ratio e^-.5 = .60653 < .8            -> max(-.60653, -.8) = -.60653, not clipped
    # t4 A=-1 ratio e^1.5 = 4.48169 > 1.2          -> max(4.48169, 1.2) = 4.48169, not clipped
    _, loss, stats = _ppo([0.1, 0.2, -0.5, -0.5, 1.5], [1.0, 1.0, -1.0, 1.0, -1.0], eps_clip=0.2, eps_clip_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([-E(0.1), -1.2, 0.8, -E(-0.5), E(1.5)]))
    assert stats["clipped"].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(stats["ratio"], torch.tensor([E(0.1), E(0.2), E(-0.5), E(-0.5), E(1.5)]))
    assert not stats["ratio"].requires_grad


def test_clip_higher():
    # eps_clip_high .28: upper bound 1.28, so t1's ratio 1.2214 is no longer clipped (-1.2214)
    # t5 A=+1 ratio e^.3 = 1.34986 > 1.28 -> -1.28, clipped; lower bound stays .8 (t2)
    _, loss, stats = _ppo([0.2, -0.5, 0.3], [1.0, -1.0, 1.0], eps_clip=0.2, eps_clip_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([-E(0.2), 0.8, -1.28]))
    assert stats["clipped"].tolist() == [0.0, 1.0, 1.0]


def test_dual_clip():
    # c = 3. A=-1 ratio e^1.5 = 4.48169: min(4.48169, -A * 3 = 3) = 3
    # A=-1 ratio e^.1 = 1.10517: min(1.10517, 3) = 1.10517 (bound not reached)
    # A=+1 ratio e^1.5: dual clip ignores positive advantages -> max(-4.48, -1.2) = -1.2
    logp, loss, _ = _ppo([1.5, 0.1, 1.5], [-1.0, -1.0, 1.0], eps_clip=0.2, eps_clip_high=0.2, eps_clip_c=3.0)
    torch.testing.assert_close(loss, torch.tensor([3.0, E(0.1), -1.2]))
    loss.sum().backward()
    # the dual-clipped and clipped tokens carry no gradient; the middle one d(-A r)/dlogp = r
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, E(0.1), 0.0]))


def test_dual_clip_bound_must_exceed_one():
    with pytest.raises(ValueError, match="eps_clip_c must be 0 \\(off\\) or > 1, got 0.5"):
        _ppo([0.0], [1.0], eps_clip=0.2, eps_clip_high=0.2, eps_clip_c=0.5)


def test_gradient_is_minus_a_ratio_over_num_tokens_or_zero():
    # token_mean over num_tokens = 5: d pg_loss / d logp = -A * ratio / 5 unclipped, 0 clipped
    log_ratio, adv = [0.1, 0.2, -0.5, -0.5, 1.5], [1.0, 1.0, -1.0, 1.0, -1.0]
    logp, loss, stats = _ppo(log_ratio, adv, eps_clip=0.2, eps_clip_high=0.2)
    aggregate(loss, torch.ones(5), "token_mean", num_tokens=5, num_seqs=1).backward()
    ratio, a = torch.tensor(log_ratio).exp(), torch.tensor(adv)
    expected = torch.where(stats["clipped"].bool(), torch.zeros(5), -a * ratio / 5)
    torch.testing.assert_close(logp.grad, expected)
    assert logp.grad[1].item() == 0.0 and logp.grad[2].item() == 0.0


X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_token_mean():
    # (1 + 2 + 4) / 3 tokens = 2.33333; with a global count of 6 tokens: 7 / 6
    torch.testing.assert_close(aggregate(X, MASK, "token_mean", num_tokens=3, num_seqs=3), torch.tensor(7 / 3))
    torch.testing.assert_close(aggregate(X, MASK, "token_mean", num_tokens=6, num_seqs=3), torch.tensor(7 / 6))


def test_seq_mean_token_mean():
    # per-seq means (1 + 2) / 2 = 1.5, 4 / 1 = 4, empty row 0 / max(0, 1) = 0 -> 5.5 / 3 seqs
    out = aggregate(X, MASK, "seq_mean_token_mean", num_tokens=3, num_seqs=3)
    torch.testing.assert_close(out, torch.tensor(5.5 / 3))


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'token_meen' \\(did you mean 'token_mean'\\?\\)"):
        aggregate(X, MASK, "token_meen", num_tokens=3, num_seqs=3)
    with pytest.raises(ValueError, match="num_tokens and num_seqs must be > 0"):
        aggregate(X, MASK, "token_mean", num_tokens=0, num_seqs=3)


# Two sequences, T = 2, second sequence's last token is padding.
# log ratios [[.1, .2], [-.5, 0]], A [[1, 1], [-1, -1]], eps .2:
#   t00 -1.10517 (unclipped), t01 -1.2 (clipped), t10 .8 (clipped), t11 padding
# token_mean over 3 tokens: pg_loss = (-1.10517 - 1.2 + .8) / 3 = -.50172, clipfrac 2 / 3,
# ppo_kl = mean(old - new) = (-.1 - .2 + .5) / 3 = .066667
LOGP = torch.tensor([[0.1, 0.2], [-0.5, 0.0]])
ADV = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
LMASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
PG = (-E(0.1) - 1.2 + 0.8) / 3


def _policy(cfg, **extra):
    return policy_loss(cfg, log_probs=LOGP, old_log_probs=torch.zeros(2, 2), advantages=ADV,
                       loss_mask=LMASK, num_tokens=3, num_seqs=2, **extra)


def test_policy_loss_pg_only():
    loss, metrics = _policy(AlgoConfig())
    assert metrics.keys() == {"pg_loss", "pg_clipfrac", "ppo_kl", "loss"}
    assert metrics["pg_loss"] == pytest.approx(PG) and metrics["loss"] == pytest.approx(PG)
    assert metrics["pg_clipfrac"] == pytest.approx(2 / 3)
    assert metrics["ppo_kl"] == pytest.approx(0.2 / 3)
    assert loss.item() == pytest.approx(PG)


def test_policy_loss_with_kl_and_entropy():
    # k1 against ref 0: logp itself, masked mean (.1 + .2 - .5) / 3 = -.066667
    # entropy [[1, 2], [3, 99(pad)]] -> (1 + 2 + 3) / 3 = 2
    # loss = PG + .5 * (-.066667) - .01 * 2
    cfg = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.5, kl_loss_type="k1", entropy_coef=0.01)
    entropy = torch.tensor([[1.0, 2.0], [3.0, 99.0]])
    loss, metrics = _policy(cfg, ref_log_probs=torch.zeros(2, 2), entropy=entropy)
    assert metrics["kl_loss"] == pytest.approx(-0.2 / 3)
    assert metrics["entropy_loss"] == pytest.approx(2.0)
    assert loss.item() == pytest.approx(PG + 0.5 * (-0.2 / 3) - 0.01 * 2.0)
    assert metrics["loss"] == pytest.approx(loss.item())


def test_entropy_without_coefficient_is_only_logged():
    loss, metrics = _policy(AlgoConfig(), entropy=torch.ones(2, 2))
    assert metrics["entropy_loss"] == pytest.approx(1.0)
    assert loss.item() == pytest.approx(PG)


def test_seq_mean_token_mean_policy_loss():
    # per-seq: (-1.10517 - 1.2) / 2 = -1.15259, .8 / 1 = .8 -> (-1.15259 + .8) / 2 = -.17629
    _, metrics = _policy(AlgoConfig(loss_agg_mode="seq_mean_token_mean"))
    assert metrics["pg_loss"] == pytest.approx(((-E(0.1) - 1.2) / 2 + 0.8) / 2)
    assert metrics["pg_clipfrac"] == pytest.approx((0.5 + 1.0) / 2)


def test_policy_loss_missing_inputs():
    with pytest.raises(ValueError, match="use_kl_loss is set but ref_log_probs was not given"):
        _policy(AlgoConfig(use_kl_loss=True))
    with pytest.raises(ValueError, match="entropy_coef is 0.1 but entropy was not given"):
        _policy(AlgoConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match=r"entropy has shape \(2,\) but loss_mask has \(2, 2\)"):
        _policy(AlgoConfig(), entropy=torch.ones(2))


def _random_batch(seed: int, num_seqs: int = 6, max_len: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 4, 0, 5, 3])  # one all-padding row on purpose
    mask = (torch.arange(max_len) < lengths[:, None]).float()
    old = -torch.rand(num_seqs, max_len, generator=gen) * 3
    return {
        "log_probs": (old + torch.randn(num_seqs, max_len, generator=gen) * 0.3).requires_grad_(),
        "old_log_probs": old,
        "ref_log_probs": old + torch.randn(num_seqs, max_len, generator=gen) * 0.2,
        "entropy": torch.rand(num_seqs, max_len, generator=gen).requires_grad_(),
        "advantages": torch.randn(num_seqs, 1, generator=gen).expand(num_seqs, max_len) * mask,
        "loss_mask": mask,
    }


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_micro_batches_sum_to_full_batch(mode):
    cfg = AlgoConfig(loss_agg_mode=mode, eps_clip_high=0.28, eps_clip_c=3.0, use_kl_loss=True,
                     kl_loss_coef=0.1, entropy_coef=0.01)
    batch = _random_batch(0)
    counts = {"num_tokens": batch["loss_mask"].sum().item(), "num_seqs": 6}
    full_loss, full_metrics = policy_loss(cfg, **batch, **counts)
    full_grads = torch.autograd.grad(full_loss, [batch["log_probs"], batch["entropy"]])

    leaves = [batch["log_probs"], batch["entropy"]]
    micro_loss, micro_metrics = torch.zeros(()), dict.fromkeys(full_metrics, 0.0)
    for rows in (slice(0, 2), slice(2, 6)):
        loss, metrics = policy_loss(cfg, **{k: v[rows] for k, v in batch.items()}, **counts)
        loss.backward()  # gradient accumulation, as the trainer does
        micro_loss = micro_loss + loss.detach()
        micro_metrics = {k: micro_metrics[k] + metrics[k] for k in metrics}

    torch.testing.assert_close(micro_loss, full_loss.detach(), atol=1e-7, rtol=0)
    for leaf, full_grad in zip(leaves, full_grads):
        assert torch.equal(leaf.grad, full_grad)  # per-token gradients do not mix rows: bitwise
    for key, value in full_metrics.items():
        assert micro_metrics[key] == pytest.approx(value, abs=1e-7)
