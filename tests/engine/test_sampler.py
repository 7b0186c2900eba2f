"""Next-token sampling on hand-made logits: temperature, top-k, top-p (alone and together),
greedy rows, inverse-CDF draws from a given uniform, zero-probability tokens at bin edges,
per-row parameters in one batch, and an empirical check of the sampled distribution; on GPU the
fast mode's fused Triton sampler against the same cases and the torch sampler."""

from __future__ import annotations

import math

import pytest
import torch

from miles_core.engine.sampler import process_logits, sample_tokens

NEG_INF = float("-inf")
# probs [0.5, 0.3, 0.15, 0.05]: cumulative mass [0.5, 0.8, 0.95, 1.0]
PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = torch.tensor([PROBS]).log()


def rows(*values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def process(logits, temperature=1.0, top_k=-1, top_p=1.0) -> torch.Tensor:
    return process_logits(logits, rows(temperature), rows(top_k, dtype=torch.long), rows(top_p))


def sample(logits, uniform, temperature=1.0, top_k=-1, top_p=1.0):
    tokens, logprobs = sample_tokens(logits, rows(temperature), rows(top_k, dtype=torch.long),
                                     rows(top_p), rows(uniform))
    return int(tokens[0]), float(logprobs[0])


def test_temperature_scales_logits_and_logprob():
    # logits / 0.5 = [4, 2, 0, -2]; exp = [54.598, 7.389, 1.0, 0.1353], sum 63.123
    # probs [0.86495, 0.11706, 0.01584, 0.00214]; cdf [0.86495, 0.98201, ...]
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(process(logits, temperature=0.5), torch.tensor([[4.0, 2.0, 0.0, -2.0]]))
    token, logprob = sample(logits, 0.9, temperature=0.5)
    assert token == 1  # 0.86495 <= 0.9 < 0.98201
    assert logprob == pytest.approx(2.0 - math.log(63.1226), abs=1e-5)  # -2.14509
    assert logprob == pytest.approx(float(torch.log_softmax(logits / 0.5, -1)[0, 1]), abs=1e-6)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    expected = torch.tensor([[NEG_INF, 3.0, NEG_INF, 2.0, NEG_INF]])
    assert torch.equal(process(logits, top_k=2), expected)
    # Renormalised over {1, 3}: logprob of token 3 = 2 - log(e^3 + e^2) = -1.31326
    token, logprob = sample(logits, 0.99, top_k=2)
    assert (token, logprob) == (3, pytest.approx(2.0 - math.log(math.exp(3) + math.exp(2)), abs=1e-6))


@pytest.mark.parametrize(("top_p", "kept"), [
    (0.5, 1),    # token 0 alone reaches 0.5
    (0.79, 2),
    (0.8, 2),    # 0.5 + 0.3 reaches 0.8 exactly: the prefix stops there
    (0.81, 3),   # needs 0.5 + 0.3 + 0.15 = 0.95
    (0.95, 3),
    (0.96, 4),
])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    out = process(LOGITS, top_p=top_p)
    assert torch.isfinite(out[0]).tolist() == [True] * kept + [False] * (4 - kept)
    torch.testing.assert_close(out[0, :kept], LOGITS[0, :kept])  # kept logits unchanged


def test_logprobs_are_of_the_renormalised_filtered_distribution():
    # top_p 0.81 keeps [0.5, 0.3, 0.15] (mass 0.95): renormalised [0.52632, 0.31579, 0.15789]
    # cdf [0.52632, 0.84211, 1.0]; uniform 0.9 picks token 2: log(0.15 / 0.95) = -1.84583
    assert sample(LOGITS, 0.9, top_p=0.81) == (2, pytest.approx(math.log(0.15 / 0.95), abs=1e-6))
    # top_p 0.8 keeps [0.5, 0.3]: renormalised [0.625, 0.375]; uniform 0.7 picks token 1
    assert sample(LOGITS, 0.7, top_p=0.8) == (1, pytest.approx(math.log(0.375), abs=1e-6))


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # top_k 2 leaves [0.625, 0.375]: 0.625 alone reaches top_p 0.6, so one token survives.
    # Without top_k, 0.5 < 0.6 and two survive.
    assert torch.isfinite(process(LOGITS, top_k=2, top_p=0.6)[0]).tolist() == [True, False, False, False]
    assert torch.isfinite(process(LOGITS, top_p=0.6)[0]).tolist() == [True, True, False, False]


def test_greedy_returns_argmax_and_unscaled_logprob():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    # temperature 0 ignores top-k/top-p and the uniform; logprob under the unscaled softmax:
    # 3 - log(1 + e + e^3 + e^2) = 3 - log(31.8022) = -0.45986
    for uniform in (0.0, 0.999):
        token, logprob = sample(logits, uniform, temperature=0.0, top_k=1, top_p=0.1)
        assert token == 2
        assert logprob == pytest.approx(3.0 - math.log(1 + math.e + math.e**3 + math.e**2), abs=1e-6)
    assert torch.equal(process(logits, temperature=0.0, top_k=1, top_p=0.1), logits)


@pytest.mark.parametrize(("uniform", "token"), [(0.0, 0), (0.05, 0), (0.25, 1), (0.59, 2), (0.61, 3), (0.999, 3)])
def test_inverse_cdf_picks_the_bin_holding_the_uniform(uniform, token):
    # probs [0.1, 0.2, 0.3, 0.4]: bins [0, 0.1), [0.1, 0.3), [0.3, 0.6), [0.6, 1.0)
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    chosen, logprob = sample(logits, uniform)
    assert chosen == token
    assert logprob == pytest.approx(math.log([0.1, 0.2, 0.3, 0.4][token]), abs=1e-6)


def test_zero_probability_tokens_are_never_drawn_at_bin_edges():
    below_one = 1.0 - 2.0**-24  # the largest float32 below 1, the largest torch.rand value
    # top_k 2 leaves probs [0, 0.5, 0.5, 0]: cdf [0, 0.5, 1, 1]
    logits = torch.tensor([[0.0, 5.0, 5.0, 0.0]])
    assert sample(logits, 0.0, top_k=2)[0] == 1  # not token 0's empty bin [0, 0)
    assert sample(logits, 0.5, top_k=2)[0] == 2
    assert sample(logits, below_one, top_k=2)[0] == 2  # not the trailing empty bin
    # A -inf logit in the middle: probs [0.5, 0, 0.5], cdf [0.5, 0.5, 1.0]
    middle = torch.tensor([[0.0, NEG_INF, 0.0]])
    assert sample(middle, 0.5) == (2, pytest.approx(math.log(0.5), abs=1e-6))
    assert sample(middle, 0.4999) == (0, pytest.approx(math.log(0.5), abs=1e-6))


def test_rows_use_their_own_parameters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4, -1)
    temperature = rows(1.0, 0.0, 0.5, 2.0)
    top_k = rows(2, 1, -1, -1, dtype=torch.long)
    top_p = rows(1.0, 1.0, 0.9, 1.0)
    out = process_logits(logits, temperature, top_k, top_p)
    # row 0: top_k 2 -> [2, 1, -inf, -inf]; row 1: greedy, untouched;
    # row 2: /0.5 = [4, 2, 0, -2], probs [0.865, 0.117, ...], 0.865 < 0.9 -> two kept;
    # row 3: /2 = [1, 0.5, 0, -0.5], nothing filtered
    expected = torch.tensor([[2.0, 1.0, NEG_INF, NEG_INF], [2.0, 1.0, 0.0, -1.0],
                             [4.0, 2.0, NEG_INF, NEG_INF], [1.0, 0.5, 0.0, -0.5]])
    assert torch.equal(out, expected)
    tokens, logprobs = sample_tokens(logits, temperature, top_k, top_p, rows(0.99, 0.99, 0.99, 0.99))
    assert tokens.tolist() == [1, 0, 1, 3]
    torch.testing.assert_close(logprobs, torch.log_softmax(expected, -1).gather(-1, tokens[:, None])[:, 0])
    # The same rows drawn one at a time give the same tokens and logprobs.
    for i in range(4):
        alone = sample_tokens(logits[i : i + 1], temperature[i : i + 1], top_k[i : i + 1],
                              top_p[i : i + 1], rows(0.99))
        assert (int(alone[0]), float(alone[1])) == (tokens[i].item(), logprobs[i].item())


def test_empirical_distribution_matches_target():
    draws = 20000
    logits = torch.tensor([1.0, 0.0, 2.0, -0.5, 1.5, -3.0])
    # temperature 0.7, top_k 4 keeps tokens {2, 4, 0, 1}; target = softmax over them of logits / 0.7
    target = torch.full((6,), NEG_INF)
    keep = torch.tensor([0, 1, 2, 4])
    target[keep] = logits[keep] / 0.7
    target = torch.softmax(target, -1)
    uniform = torch.rand(draws, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample_tokens(logits.expand(draws, -1), torch.full((draws,), 0.7),
                                     torch.full((draws,), 4), torch.ones(draws), uniform)
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[3] == 0 and counts[5] == 0
    stderr = (target * (1 - target) / draws).sqrt()
    assert ((counts / draws - target).abs() <= 4 * stderr + 1e-12).all(), (counts / draws, target)
    torch.testing.assert_close(logprobs, target.log()[tokens])


@pytest.mark.parametrize("temperatures", [(1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (0.7, 1.0, 0.0), (0.0, 0.0, 0.0)])
def test_the_engines_flags_skip_passes_without_changing_a_bit(temperatures):
    """The flags `SamplingTensors` derives from the rows' settings (no division when every
    temperature is 0 or 1, no argmax without a greedy row) give bitwise the tokens and logprobs
    of the flag-free path, and match what the tensors say."""
    from miles_core.config import SamplingConfig
    from miles_core.engine.native.sampling_tensors import SamplingTensors
    from miles_core.engine.sampler import flags_of

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 97, generator=gen) * 3
    uniform = torch.rand(3, generator=gen)
    params = [SamplingConfig(temperature=t) for t in temperatures]
    temperature, top_k, top_p, flags = SamplingTensors().of(params, torch.device("cpu"))
    assert flags == flags_of(temperature, top_k, top_p)
    assert flags.scaled == any(t not in (0.0, 1.0) for t in temperatures)
    assert flags.greedy == (0.0 in temperatures) and not flags.filtered
    fast = sample_tokens(logits, temperature, top_k, top_p, uniform, flags=flags)
    full = sample_tokens(logits, temperature, top_k, top_p, uniform,
                         flags=type(flags)(filtered=True, greedy=True, scaled=True))
    assert torch.equal(fast[0], full[0]) and torch.equal(fast[1], full[1])


def _fused(logits, temperature, uniform, exact=False):
    """The Triton sampler on CUDA, through `sample_tokens` as the engine calls it (`exact`:
    invariant mode's)."""
    count = logits.shape[0]
    return sample_tokens(logits.cuda(), temperature.cuda(), torch.full((count,), -1, device="cuda"),
                         torch.ones(count, device="cuda"), uniform.cuda(), fused=True, exact=exact)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("uniform", "token"),
                         [(0.0, 0), (0.05, 0), (0.25, 1), (0.59, 2), (0.61, 3), (1.0 - 2.0**-24, 3)])
def test_fused_sampler_picks_the_bin_holding_the_uniform(uniform, token):
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    tokens, logprobs = _fused(logits, rows(1.0), rows(uniform))
    assert int(tokens[0]) == token
    assert float(logprobs[0]) == pytest.approx(math.log([0.1, 0.2, 0.3, 0.4][token]), abs=1e-6)
    middle = torch.tensor([[0.0, NEG_INF, 0.0]])  # a zero-probability bin is never drawn
    assert int(_fused(middle, rows(1.0), rows(0.5))[0][0]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_sampler_matches_the_torch_sampler_on_a_real_vocabulary():
    """bf16 logits over 151,936 tokens (37 blocks and a partial one), greedy, scaled and plain
    rows, against a float64 reference: greedy rows take the argmax; every sampled token's bin
    holds the row's uniform number up to fp32 rounding of the cumulative sums; log-probs within
    fp32 rounding. The torch sampler's cumulative sums round otherwise, so a draw within
    rounding of a bin edge may differ from it: almost all agree."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(256, 151936, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3], device="cuda").repeat(64)
    uniform = torch.rand(256, device="cuda", generator=gen)
    off, ones = torch.full((256,), -1, device="cuda"), torch.ones(256, device="cuda")
    tokens, logprobs = sample_tokens(logits, temperature, off, ones, uniform, fused=True)
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))
    scale = torch.where(greedy, 1.0, temperature).double()
    reference = torch.log_softmax(logits.double() / scale[:, None], -1)
    chosen = reference.gather(1, tokens[:, None])[:, 0]
    mass_to = reference.exp().cumsum(-1).gather(1, tokens[:, None])[:, 0]
    mass_from = mass_to - chosen.exp()
    sampled = ~greedy
    assert ((mass_from[sampled] - 1e-5 <= uniform[sampled]) & (uniform[sampled] < mass_to[sampled] + 1e-5)).all()
    torch.testing.assert_close(logprobs.double(), chosen, rtol=0, atol=2e-5)
    expected, _ = sample_tokens(logits, temperature, off, ones, uniform)
    assert (tokens == expected).float().mean() >= 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_sampler_frequencies_are_the_distribution():
    """Evenly spaced uniforms: each token is drawn for its probability's share of them."""
    draws = 20000
    logits = torch.tensor([1.0, 0.0, 2.0, -0.5, 1.5, NEG_INF])
    target = torch.softmax(logits / 0.7, -1)
    uniform = (torch.arange(draws) + 0.5) / draws
    tokens, logprobs = _fused(logits.expand(draws, -1), torch.full((draws,), 0.7), uniform)
    counts = torch.bincount(tokens.cpu(), minlength=6).double()
    assert counts[5] == 0
    assert ((counts / draws - target).abs() <= 2 / draws).all(), (counts / draws, target)
    torch.testing.assert_close(logprobs.cpu(), target.log()[tokens.cpu()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_fused_sampler_logprobs_are_the_invariant_log_softmax_bits_at_any_batch():
    """Invariant mode samples with the fused kernel: each log-prob must be exactly what the
    trainer's invariant log-softmax gives that token (temperatures divided as the trainer
    divides), and a row's token and log-prob must not depend on its batch. Its draws follow the
    same rule as fast mode's."""
    from miles_core.kernels import invariant

    gen = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(256, 151936, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3], device="cuda").repeat(64)
    uniform = torch.rand(256, device="cuda", generator=gen)
    tokens, logprobs = _fused(logits, temperature, uniform, exact=True)
    scale = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    trainer = invariant.log_softmax(logits.float() / scale[:, None]).gather(1, tokens[:, None])[:, 0]
    assert torch.equal(logprobs, trainer)
    fast_tokens, fast_logprobs = _fused(logits, temperature, uniform)
    assert (fast_tokens == tokens).float().mean() >= 0.95
    torch.testing.assert_close(fast_logprobs, logprobs, rtol=0, atol=2e-5)
    for rows in (slice(0, 1), slice(5, 8), slice(100, 164)):
        alone = _fused(logits[rows], temperature[rows], uniform[rows], exact=True)
        assert torch.equal(alone[0], tokens[rows]) and torch.equal(alone[1], logprobs[rows])
