"""The paged engine against the previous static-batch engine (`reference_engine`) on tiny Llama,
Qwen3 (q/k norm), Qwen3-MoE and DeepSeek-V3 (MLA): invariant mode is bitwise equal (tokens,
log-probs, routed experts) with preemption and chunked prefill forced; fast-mode greedy tokens
are equal and log-probs within 1e-5. Blocks never leak."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paged_helpers import FAMILIES, FORCED, assert_no_leak, flat, model_for, paged, prompts, reference, requests


def assert_same(got, expected, exact: bool) -> None:
    for x, y in zip(flat(got), flat(expected), strict=True):
        assert x.output_ids == y.output_ids
        assert x.finish_reason == y.finish_reason
        if exact:
            assert x.output_logprobs == y.output_logprobs
        else:
            torch.testing.assert_close(torch.tensor(x.output_logprobs), torch.tensor(y.output_logprobs),
                                       atol=1e-5, rtol=0)
        if y.routed_experts is not None:
            assert x.routed_experts.shape == (len(x.output_ids) + x.prompt_tokens - 1,) + y.routed_experts.shape[1:]
            if exact:
                assert np.array_equal(x.routed_experts, y.routed_experts)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def invariant_case(request):
    model = model_for(request.param, "invariant")
    reqs = requests(prompts(6, seed=1), n=2, stop_token_ids=(7, 77))  # some stop early
    return request.param, model, reqs, reference(model).generate(reqs)


@pytest.mark.parametrize("forcing", sorted(FORCED))
def test_invariant_mode_is_bitwise_equal_to_the_previous_engine(invariant_case, forcing):
    family, model, reqs, expected = invariant_case
    engine = paged(model, **FORCED[forcing])
    got = engine.generate(reqs)
    assert_same(got, expected, exact=True)
    if "preempt" in forcing:
        assert engine.scheduler.num_preemptions > 0
    assert_no_leak(engine)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("forcing", ["preempt", "chunked"])
def test_fast_mode_greedy_tokens_equal_and_log_probs_close(family, forcing):
    model = model_for(family, "fast")
    reqs = requests(prompts(5, seed=2), n=2, temperature=0.0, max_new_tokens=10)
    engine = paged(model, **FORCED[forcing])
    assert_same(engine.generate(reqs), reference(model).generate(reqs), exact=False)
    assert_no_leak(engine)


def test_greedy_equals_the_models_full_forward():
    """The simplest reference: argmax of one full forward over prompt + output so far."""
    model = model_for("qwen3", "fast")
    [prompt] = prompts(1, seed=3, low=70, high=71)  # crosses a 64-token block
    got = paged(model).generate(requests([prompt], n=1, temperature=0.0, max_new_tokens=8))[0][0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            hidden = model(torch.tensor([ids]), torch.arange(len(ids))[None])
            ids.append(int(model.lm_head(hidden[0, -1]).argmax()))
    assert got.output_ids == ids[len(prompt):]


def test_samples_share_the_prompt_and_forks_equal_separate_prefills():
    """n samples forked from one prefill equal the same samples prefilled one by one (batch of
    one: siblings cannot fork and each recomputes its partial block after a prefix-cache hit)."""
    model = model_for("qwen3-moe", "invariant")
    reqs = requests(prompts(3, seed=4, low=20, high=60), n=3)
    forked = paged(model, block_size=16)
    one_by_one = paged(model, block_size=16, max_batch_size=1)
    assert_same(forked.generate(reqs), one_by_one.generate(reqs), exact=True)
    assert one_by_one.blocks.num_hits > 0
    assert_no_leak(forked)
    assert_no_leak(one_by_one)


def test_prefix_cache_hit_equals_miss_and_is_flushed():
    model = model_for("deepseek-v3", "invariant")
    reqs = requests(prompts(2, seed=5, low=40, high=70), n=2)
    engine = paged(model, block_size=16)
    miss = engine.generate(reqs)
    assert engine.blocks.num_cached > 0 and engine.blocks.num_hits == 0
    hit = engine.generate(reqs)
    assert engine.blocks.num_hits > 0
    assert_same(hit, miss, exact=True)  # routed experts of cached prompt tokens included
    assert_no_leak(engine)
    engine.flush_cache()
    assert engine.blocks.num_cached == 0
    engine.generate(reqs)
    engine.update_weights([("lm_head.weight", model.lm_head.weight.clone())], version="2")
    assert engine.blocks.num_cached == 0  # K/V of old weights are never reused


def test_hash_collisions_are_caught_by_the_token_check(monkeypatch):
    from miles_core.engine.native import block_manager

    monkeypatch.setattr(block_manager, "block_hash", lambda parent, ids: 42)  # every block collides
    model = model_for("llama", "invariant")
    first, second = requests(prompts(2, seed=6, low=40, high=41), n=1)
    engine = paged(model, block_size=16)
    engine.generate([first])
    got = engine.generate([second])  # same hash, other tokens: must not be reused
    assert engine.blocks.num_hits == 0
    assert_same(got, paged(model, block_size=16).generate([second]), exact=True)
    engine.generate([first])  # same tokens: a real hit
    assert engine.blocks.num_hits == 1


def test_prefix_cache_is_evicted_when_the_pool_needs_blocks():
    model = model_for("qwen3", "invariant")
    engine = paged(model, block_size=16, num_kv_blocks=10)
    for seed in range(4):  # each run leaves cached blocks that the next run must evict
        reqs = requests(prompts(3, seed=10 + seed, low=20, high=40), n=2)
        assert_same(engine.generate(reqs), reference(model).generate(reqs), exact=True)
        assert_no_leak(engine)
