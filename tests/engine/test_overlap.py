"""Overlapped decode steps (`engine.overlap`): in invariant mode the same outputs bit for bit as
the plain order, with steps actually planned ahead, through stops found a step late, length
limits, preemption, chunked prefill, forks, aborts and weight updates; no block leaks; `auto` is
off on CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from miles_core.config import EngineConfig
from miles_core.engine.native import NativeEngine
from paged_helpers import FORCED, ByteTokenizer, assert_no_leak, flat, model_for, prompts, requests, run_with_abort

EOS = (7, 11, 200)  # frequent enough in 256 bytes that some samples stop early


def engine_for(model, overlap: bool, **cfg) -> NativeEngine:
    cfg = {"return_routed_experts": True, **cfg}
    return NativeEngine(model, ByteTokenizer(), EngineConfig(overlap="on" if overlap else "off", **cfg),
                        eos_token_ids=EOS, max_position_embeddings=1024)


def outputs(gens) -> list[tuple]:
    return [(g.output_ids, g.output_logprobs, g.finish_reason, None if g.routed_experts is None
             else g.routed_experts.tolist()) for g in flat(gens)]


def count_ahead(engine: NativeEngine) -> list[int]:
    """Wrap `_step_ahead`; the list counts the steps it planned ahead."""
    taken, real = [0], engine._step_ahead

    def counted() -> bool:
        went = real()
        taken[0] += went
        return went

    engine._step_ahead = counted
    return taken


def mixed_requests(count: int, seed: int):
    """Samples with stop tokens, a stop string, and different length limits."""
    reqs = requests(prompts(count, seed=seed), n=3, temperature=1.0, max_new_tokens=24)
    reqs[1] = replace(reqs[1], sampling=replace(reqs[1].sampling, max_new_tokens=5))
    reqs[2] = replace(reqs[2], sampling=replace(reqs[2].sampling, stop=["a"], max_new_tokens=40))
    return reqs


@pytest.mark.parametrize("family", ["llama", "qwen3-moe"])
@pytest.mark.parametrize("forced", list(FORCED))
def test_overlap_gives_the_plain_orders_bits(family, forced):
    model = model_for(family)
    reqs = mixed_requests(5, seed=3)
    plain = engine_for(model, False, **FORCED[forced])
    expected = outputs(plain.generate(reqs))
    engine = engine_for(model, True, **FORCED[forced])
    ahead = count_ahead(engine)
    assert outputs(engine.generate(reqs)) == expected
    assert ahead[0] > 0
    assert {reason["type"] for _, _, reason, _ in expected} == {"stop", "length"}
    assert_no_leak(engine)
    assert_no_leak(plain)


def test_auto_overlaps_on_cuda_only():
    model = model_for("qwen3")
    engine = NativeEngine(model, ByteTokenizer(), EngineConfig(), eos_token_ids=EOS, max_position_embeddings=1024)
    assert engine._overlap is False  # CPU


def test_most_decode_steps_of_a_steady_batch_go_ahead():
    model = model_for("qwen3")
    reqs = requests(prompts(4, seed=5), n=2, temperature=1.0, max_new_tokens=30)
    engine = engine_for(model, True, block_size=16)
    ahead = count_ahead(engine)
    engine.generate(reqs)
    # 30 tokens: the first is sampled by the prefill; the step that reads the last-but-one
    # token cannot plan past the length limit; blocks come from the pool as planned.
    assert ahead[0] >= 25


def test_abort_with_a_step_in_flight_matches_the_plain_order():
    model = model_for("llama")
    reqs = requests(prompts(3, seed=9), n=2, temperature=1.0, max_new_tokens=16)
    expected = run_with_abort(engine_for(model, False, block_size=16), reqs, steps=6, rid="r1")
    engine = engine_for(model, True, block_size=16)
    got = run_with_abort(engine, reqs, steps=6, rid="r1")
    assert outputs(got) == outputs(expected)
    assert {g.finish_reason["type"] for g in got[1]} == {"abort"}
    assert_no_leak(engine)


def test_a_weight_update_reads_the_pending_step_first():
    model = model_for("qwen3")
    reqs = requests(prompts(2, seed=4), n=1, temperature=1.0, max_new_tokens=12)
    engine = engine_for(model, True, block_size=16)
    handles = [engine.submit(r) for r in reqs]
    for _ in range(4):
        engine.step()
    assert engine._pending is not None
    lengths = [len(h.sequences[0].token_ids) for h in handles]
    weight = model.model.norm.weight
    engine.update_weights([("model.norm.weight", weight.detach() * 1.0)], version="1")
    assert engine._pending is None
    assert [len(h.sequences[0].token_ids) for h in handles] == [n + 1 for n in lengths]
    while engine.step():
        pass
    assert all(h.done for h in handles)
    assert_no_leak(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["fast", "invariant"])
def test_overlap_with_cuda_graphs_gives_the_plain_orders_bits(mode):
    model = model_for("qwen3", mode).cuda()
    reqs = mixed_requests(6, seed=2)
    expected = outputs(engine_for(model, False, block_size=64, mem_fraction=0.1).generate(reqs))
    engine = engine_for(model, True, block_size=64, mem_fraction=0.1)
    assert engine.runner.graphs is not None
    ahead = count_ahead(engine)
    assert outputs(engine.generate(reqs)) == expected
    assert ahead[0] > 0
    assert_no_leak(engine)
