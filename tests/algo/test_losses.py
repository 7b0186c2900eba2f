"""PPO clip loss, aggregation and `policy_loss` against hand-computed numbers, plus the
micro-batch property: global denominators make micro-batch losses and gradients sum exactly."""

from __future__ import annotations

import math

import pytest
import torch

from miles_core.algo import (
    accumulate_metrics,
    aggregate,
    cispo_loss,
    gspo_loss,
    policy_loss,
    ppo_clip_loss,
    tis_batch_mean,
    value_loss,
)
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


def test_seq_mean_token_sum_norm():
    # Dr. GRPO constant 4: row sums 1 + 2 = 3, 4, 0 -> (3 / 4 + 4 / 4 + 0) / 3 seqs = .58333
    out = aggregate(X, MASK, "seq_mean_token_sum_norm", num_tokens=3, num_seqs=3, norm_len=4)
    torch.testing.assert_close(out, torch.tensor(1.75 / 3))
    with pytest.raises(ValueError, match="norm_len > 0"):
        aggregate(X, MASK, "seq_mean_token_sum_norm", num_tokens=3, num_seqs=3)


def test_gspo_sequence_ratio_and_gradient():
    # row 0: log ratios [.1, .3] -> s = exp(.2) = 1.22140 on both tokens, A = +1, eps [.2, .3]: inside,
    #        pg = -1.22140 per token
    # row 1: log ratios [-.2, pad 5] -> s = exp(-.2) = .81873 (padding ignored), A = -1: max(.81873, .81873)
    # token_mean over 3 tokens: (-1.22140 * 2 + .81873) / 3 = -.54136
    # d loss / d logp: row 0 = 2 tokens * (-ds/dlogp_t) / 3 with ds/dlogp_t = s / 2 -> -s / 3 = -.40713;
    #                  row 1 = (ds/dlogp_0) / 3 = s / 1 / 3 = .27291, padding 0
    logp = torch.tensor([[0.1, 0.3], [-0.2, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    pg, stats = gspo_loss(logp, torch.zeros(2, 2), adv, mask, eps_clip=0.2, eps_clip_high=0.3)
    loss = aggregate(pg, mask, "token_mean", num_tokens=3, num_seqs=2)
    torch.testing.assert_close(loss, torch.tensor((-2 * E(0.2) + E(-0.2)) / 3))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-E(0.2) / 3, -E(0.2) / 3], [E(-0.2) / 3, 0.0]]))
    assert stats["clipped"][:, 0].tolist() == [0.0, 0.0]


def test_gspo_clips_whole_sequence():
    # log ratios [.4, .6] -> s = exp(.5) = 1.64872 > 1.3 with A = +1: clipped, no gradient on any token
    logp = torch.tensor([[0.4, 0.6]], requires_grad=True)
    pg, stats = gspo_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), eps_clip=0.2, eps_clip_high=0.3)
    assert pg[0].tolist() == pytest.approx([-1.3, -1.3]) and stats["clipped"].tolist() == [[1.0, 1.0]]
    pg.sum().backward()
    assert logp.grad.tolist() == [[0.0, 0.0]]


def test_cispo_loss_and_gradient_only_through_logp():
    # logp [-1, -.5, -2], old [-1, -1, -1.5] -> rho [1, e^.5 = 1.64872, e^-.5 = .60653]
    # clamp to [.8, 1.28] -> w = [1, 1.28, .8]; A = [1, 1, -1]
    # pg = -w * A * logp = [-(1)(1)(-1), -(1.28)(1)(-.5), -(.8)(-1)(-2)] = [1, .64, -1.6]
    # d pg / d logp = -w * A = [-1, -1.28, .8]: clipped tokens keep a gradient, and none flows through
    # rho (with it, token 0 would get -(A rho + A rho logp) = 0)
    logp = torch.tensor([-1.0, -0.5, -2.0], requires_grad=True)
    pg, stats = cispo_loss(logp, torch.tensor([-1.0, -1.0, -1.5]), torch.tensor([1.0, 1.0, -1.0]),
                           eps_clip=0.2, eps_clip_high=0.28)
    torch.testing.assert_close(pg, torch.tensor([1.0, 0.64, -1.6]))
    pg.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-1.0, -1.28, 0.8]))
    assert stats["clipped"].tolist() == [0.0, 1.0, 1.0]


def test_opsm_masks_negative_advantages_of_drifted_rows():
    # rows: mean(old - logp) = .2 (row 0, A -1) -> masked; .2 (row 1, A +1) -> kept (A >= 0);
    #       .01 (row 2, A -1) -> kept (below delta .1)
    logp = torch.tensor([[-0.1, -0.3], [-0.1, -0.3], [-0.01, -0.01]])
    adv = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    mask = torch.ones(3, 2)
    args = dict(log_probs=logp, old_log_probs=torch.zeros(3, 2), advantages=adv, loss_mask=mask,
                num_tokens=6, num_seqs=3)
    _, off = policy_loss(AlgoConfig(eps_clip=0.5, eps_clip_high=0.5), **args)
    _, on = policy_loss(AlgoConfig(eps_clip=0.5, eps_clip_high=0.5, use_opsm=True, opsm_delta=0.1), **args)
    # row 0 (A = -1, rho = e^-.1, e^-.3, inside the clip): pg terms e^-.1 + e^-.3 = 1.64566 removed from the sum
    assert on["pg_loss"] == pytest.approx(off["pg_loss"] - (E(-0.1) + E(-0.3)) / 6)
    assert on["opsm_clipfrac"] == pytest.approx(2 / 6)


def test_value_loss_clipping():
    # value_clip .1; V = [1, .5, 0], V_old = [.8, .8, 0], R = [2, 0, 1]
    # t0: V - V_old = .2 -> V_clip = .9: max((.9 - 2)^2 = 1.21, (1 - 2)^2 = 1) = 1.21, clipped
    # t1: -.3 -> V_clip = .7: max(.49, .25) = .49, clipped
    # t2: 0 -> max(1, 1) = 1, not clipped
    # gradient: the clipped branch wins at t0, t1 (constant in V) -> 0; t2: 2 (V - R) = -2
    values = torch.tensor([1.0, 0.5, 0.0], requires_grad=True)
    loss, stats = value_loss(values, torch.tensor([0.8, 0.8, 0.0]), torch.tensor([2.0, 0.0, 1.0]), value_clip=0.1)
    torch.testing.assert_close(loss, torch.tensor([1.21, 0.49, 1.0]))
    assert stats["clipped"].tolist() == [1.0, 1.0, 0.0]
    loss.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.0, 0.0, -2.0]))
    # value_clip 0: plain squared error (1 - 2)^2, .5^2, 1
    plain, _ = value_loss(values, torch.tensor([0.8, 0.8, 0.0]), torch.tensor([2.0, 0.0, 1.0]), value_clip=0.0)
    assert plain.tolist() == [1.0, 0.25, 1.0]


def test_policy_loss_with_value_head():
    # PG as above; value per token [(1 - 2)^2, (0 - 0)^2, pad] with value_clip 0 -> (1 + 0) / 3 tokens
    # loss = PG + .5 * 1 / 3
    cfg = AlgoConfig(advantage_estimator="ppo", value_clip=0.0, value_loss_coef=0.5)
    values = torch.tensor([[1.0, 0.0], [5.0, 7.0]])
    loss, metrics = _policy(cfg, values=values, old_values=values, returns=torch.tensor([[2.0, 0.0], [5.0, 0.0]]))
    assert metrics["value_loss"] == pytest.approx(1 / 3) and metrics["value_clipfrac"] == 0.0
    assert loss.item() == pytest.approx(PG + 0.5 / 3)
    with pytest.raises(ValueError, match="advantage_estimator is 'ppo' but values was not given"):
        _policy(cfg)
    with pytest.raises(ValueError, match="values were given without old_values and returns"):
        _policy(cfg, values=values)


def test_unbiased_kl_loss():
    # k3 with rho = exp(logp - old): d/dlogp [rho * k3(x)] = rho * x, x = logp - ref
    # logp -1, old -1.2 -> rho = e^.2 = 1.22140; ref -1.5 -> x = .5, k3 = e^-.5 + .5 - 1 = .10653
    # value rho * k3 = .13012, gradient rho * x = .61070 (loss term times kl_loss_coef 1, 1 token)
    cfg = AlgoConfig(use_kl_loss=True, kl_loss_coef=1.0, kl_loss_type="k3", use_unbiased_kl=True)
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, metrics = policy_loss(cfg, log_probs=logp, old_log_probs=torch.tensor([[-1.2]]),
                                advantages=torch.zeros(1, 1), loss_mask=torch.ones(1, 1), num_tokens=1, num_seqs=1,
                                ref_log_probs=torch.tensor([[-1.5]]))
    assert metrics["kl_loss"] == pytest.approx(E(0.2) * (E(-0.5) - 0.5))
    loss.backward()
    assert logp.grad.item() == pytest.approx(E(0.2) * 0.5)


def test_policy_loss_with_tis():
    # truncate at 2: rollout logp [[-.5, -1], [-.2, pad]] vs old 0 -> rho [[e^.5 = 1.64872, e^1 = 2.71828 -> 2],
    # [e^.2 = 1.22140, pad]]; per-token pg of the PG example weighted:
    # (-1.10517 * 1.64872 - 1.2 * 2 + .8 * 1.22140) / 3 = -.88338
    # metrics: tis = mean rho = (1.64872 + 2.71828 + 1.22140) / 3, tis_clipfrac 1 / 3,
    # tis_ratio_min 1.22140, tis_ratio_max 2.71828; abs diff (.5 + 1 + .2) / 3
    cfg = AlgoConfig(use_tis=True, tis_clip_high=2.0)
    rollout = torch.tensor([[-0.5, -1.0], [-0.2, 3.0]])
    loss, metrics = _policy(cfg, rollout_log_probs=rollout)
    assert loss.item() == pytest.approx((-E(0.1) * E(0.5) - 1.2 * 2 + 0.8 * E(0.2)) / 3)
    assert metrics["tis"] == pytest.approx((E(0.5) + E(1.0) + E(0.2)) / 3)
    assert metrics["tis_clipfrac"] == pytest.approx(1 / 3) and metrics["tis_masked_frac"] == 0.0
    assert metrics["tis_ratio_min"] == pytest.approx(E(0.2)) and metrics["tis_ratio_max"] == pytest.approx(E(1.0))
    assert metrics["train_rollout_logprob_abs_diff"] == pytest.approx(1.7 / 3)
    with pytest.raises(ValueError, match="use_tis or use_rs is set but rollout_log_probs was not given"):
        _policy(cfg)


def test_sum_norm_metrics_stay_fractions():
    # pg_loss with constant 4: row sums (-1.10517 - 1.2) / 4, .8 / 4 over 2 seqs; clipfrac as seq_mean_token_mean
    _, metrics = _policy(AlgoConfig(loss_agg_mode="seq_mean_token_sum_norm", loss_scale_factor=4))
    assert metrics["pg_loss"] == pytest.approx(((-E(0.1) - 1.2) / 4 + 0.8 / 4) / 2)
    assert metrics["pg_clipfrac"] == pytest.approx((0.5 + 1.0) / 2)


def test_accumulate_metrics():
    total: dict[str, float] = {}
    accumulate_metrics(total, {"pg_loss": 1.0, "tis_ratio_min": 0.5, "tis_ratio_max": 2.0})
    accumulate_metrics(total, {"pg_loss": 2.0, "tis_ratio_min": 0.25, "tis_ratio_max": 1.5})
    assert total == {"pg_loss": 3.0, "tis_ratio_min": 0.25, "tis_ratio_max": 2.0}


def _random_batch(seed: int, num_seqs: int = 6, max_len: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 1, 4, 0, 5, 3])  # one all-padding row on purpose
    mask = (torch.arange(max_len) < lengths[:, None]).float()
    old = -torch.rand(num_seqs, max_len, generator=gen) * 3
    noise = lambda scale: torch.randn(num_seqs, max_len, generator=gen) * scale  # noqa: E731
    values = torch.randn(num_seqs, max_len, generator=gen)
    return {
        "log_probs": (old + noise(0.3)).requires_grad_(),
        "old_log_probs": old,
        "ref_log_probs": old + noise(0.2),
        "rollout_log_probs": old + noise(0.5),
        "entropy": torch.rand(num_seqs, max_len, generator=gen).requires_grad_(),
        "advantages": torch.randn(num_seqs, 1, generator=gen).expand(num_seqs, max_len) * mask,
        "loss_mask": mask,
        "values": (values + noise(0.1)).requires_grad_(),
        "old_values": values,
        "returns": values + noise(1.0),
    }


BASE = dict(eps_clip_high=0.28, eps_clip_c=3.0, use_kl_loss=True, kl_loss_coef=0.1, entropy_coef=0.01)
MICRO_CONFIGS = {
    "token_mean": dict(loss_agg_mode="token_mean"),
    "seq_mean_token_mean": dict(loss_agg_mode="seq_mean_token_mean"),
    "sum_norm": dict(loss_agg_mode="seq_mean_token_sum_norm", loss_scale_factor=7),
    "gspo": dict(advantage_estimator="gspo", policy_loss="gspo", loss_agg_mode="seq_mean_token_mean"),
    "cispo_opsm_unbiased_kl": dict(policy_loss="cispo", use_opsm=True, opsm_delta=0.0, use_unbiased_kl=True),
    "tis_token": dict(use_tis=True, tis_clip_high=1.5),
    "mis_geometric_batch_norm": dict(use_tis=True, tis_level="geometric", tis_mode="mask", tis_clip_low=0.8,
                                     tis_clip_high=1.25, tis_batch_normalize=True),
    "tis_sequence_rs_veto": dict(use_tis=True, tis_level="sequence", tis_mode="clip", tis_clip_low=0.5,
                                 use_rs=True, rs_clip_low=0.3, rs_clip_high=3.0, tis_veto_threshold=0.45),
    "ppo_value_head": dict(advantage_estimator="ppo", value_clip=0.05, kl_coef=0.0),
}


@pytest.mark.parametrize("name", MICRO_CONFIGS)
def test_micro_batches_sum_to_full_batch(name):
    cfg = AlgoConfig(**{**BASE, **MICRO_CONFIGS[name]})
    batch = _random_batch(0)
    if cfg.advantage_estimator != "ppo":
        batch = {k: v for k, v in batch.items() if k not in ("values", "old_values", "returns")}
    counts = {"num_tokens": batch["loss_mask"].sum().item(), "num_seqs": 6}
    if cfg.tis_batch_normalize:
        counts["tis_batch_mean"] = tis_batch_mean(cfg, old_log_probs=batch["old_log_probs"],
                                                  rollout_log_probs=batch["rollout_log_probs"],
                                                  loss_mask=batch["loss_mask"])
    full_loss, full_metrics = policy_loss(cfg, **batch, **counts)
    leaves = [t for t in batch.values() if t.requires_grad]
    full_grads = torch.autograd.grad(full_loss, leaves)

    micro_loss, micro_metrics = torch.zeros(()), {}
    for rows in (slice(0, 2), slice(2, 6)):
        loss, metrics = policy_loss(cfg, **{k: v[rows] for k, v in batch.items()}, **counts)
        loss.backward()  # gradient accumulation, as the trainer does
        micro_loss = micro_loss + loss.detach()
        accumulate_metrics(micro_metrics, metrics)

    torch.testing.assert_close(micro_loss, full_loss.detach(), atol=1e-6, rtol=0)
    for leaf, full_grad in zip(leaves, full_grads):
        torch.testing.assert_close(leaf.grad, full_grad, atol=1e-7, rtol=0)  # rows do not mix
    assert micro_metrics.keys() == full_metrics.keys()
    for key, value in full_metrics.items():
        assert micro_metrics[key] == pytest.approx(value, abs=1e-6), key


# Issue 19, case 1: a token rejected by MIS (mask mode) or rejection sampling leaves the KL and
# entropy terms and the training metrics too, as in slime, not only the pg term.
# B=1, T=2; logp [-1, -1.5], old [-1, -1], rollout [-1, 2], A = 1, per-sample mean (divide by 2).
# Token 2: old - rollout = -3, ratio e^-3 = .0498 outside [0.5, 2] -> rejected; token 1 ratio 1 kept.
# pg: token 1 ratio 1 -> -1; token 2 rejected -> 0; pg_loss = -1 / 2 = -.5
_REJECT = dict(log_probs=[[-1.0, -1.5]], old_log_probs=[[-1.0, -1.0]], rollout_log_probs=[[-1.0, 2.0]],
               advantages=[[1.0, 1.0]], loss_mask=[[1.0, 1.0]])
_REJECTING = {
    "mis_mask": dict(use_tis=True, tis_mode="mask", tis_clip_low=0.5, tis_clip_high=2.0),
    "rejection_sampling": dict(use_rs=True, rs_clip_low=0.5, rs_clip_high=2.0),
}


def _rejected_loss(extra_cfg, **extra):
    cfg = AlgoConfig(eps_clip=0.2, eps_clip_high=0.2, loss_agg_mode="seq_mean_token_mean", **extra_cfg)
    t = {k: torch.tensor(v) for k, v in {**_REJECT, **extra}.items()}
    logp = t.pop("log_probs").requires_grad_(True)
    loss, metrics = policy_loss(cfg, log_probs=logp, num_tokens=2, num_seqs=1, **t)
    loss.backward()
    return loss.item(), logp.grad, metrics


@pytest.mark.parametrize("rejecting", _REJECTING.values(), ids=_REJECTING.keys())
def test_rejected_token_gets_no_kl_gradient(rejecting):
    # k1 KL = logp - ref = [-1 + 1.5, -1.5 + 2] = [.5, .5]; only token 1 counts: .5 / 2 = .25
    # loss = -.5 + .1 * .25 = -.475 (before the fix: KL over both tokens, -.5 + .1 * .5 = -.45)
    # d loss / d logp_2 = 0 (before: .1 * 1 / 2 = .05)
    loss, grad, metrics = _rejected_loss(dict(rejecting, use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k1"),
                                         ref_log_probs=[[-1.5, -2.0]])
    assert loss == pytest.approx(-0.475)
    assert grad[0, 1].item() == 0.0
    # d loss / d logp_1 = (-A * ratio + .1 * 1) / 2 = (-1 + .1) / 2 = -.45
    assert grad[0, 0].item() == pytest.approx(-0.45)
    # ppo_kl = old - logp = [0, .5]; token 2 rejected -> 0 / 2 = 0 (before: .25)
    assert metrics["ppo_kl"] == pytest.approx(0.0)
    assert metrics["kl_loss"] == pytest.approx(0.25)


@pytest.mark.parametrize("rejecting", _REJECTING.values(), ids=_REJECTING.keys())
def test_rejected_token_gets_no_entropy_bonus(rejecting):
    # entropy [1, 2]; only token 1 counts: 1 / 2 = .5; loss = -.5 - .01 * .5 = -.505
    # (before the fix: -.5 - .01 * (1 + 2) / 2 = -.515)
    loss, grad, metrics = _rejected_loss(dict(rejecting, entropy_coef=0.01), entropy=[[1.0, 2.0]])
    assert loss == pytest.approx(-0.505)
    assert metrics["entropy_loss"] == pytest.approx(0.5)
    assert grad[0, 1].item() == 0.0


def test_rejection_statistics_stay_over_all_tokens():
    # tis_masked_frac counts the rejected token over both trained tokens: 1 / 2 (slime reports
    # mismatch statistics with its pre-rejection reducer, else this fraction would read 0).
    _, _, metrics = _rejected_loss(_REJECTING["mis_mask"])
    assert metrics["tis_masked_frac"] == pytest.approx(0.5)
