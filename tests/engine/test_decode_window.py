"""Continuous decode windows (`engine.num_continuous_decode_steps` = K): the generations (tokens,
log-probs, finish reasons, weight versions) are bitwise those of K = 1 on CPU, in invariant and
fast mode, greedy and seeded sampling, with n samples sharing prompt blocks, rows stopping
mid-window, a pool so small that windows fall back and sequences are preempted, an abort
mid-run, the graph path (`EagerReplayGraphs`), and every block back after a run."""

from __future__ import annotations

import pytest

from miles_core.config import EngineConfig
from miles_core.engine.native import NativeEngine
from miles_core.engine.native.block_manager import BlockManager
from miles_core.engine.native.decode_window import DecodeWindow
from miles_core.kernels import triton_ops
from paged_helpers import ByteTokenizer, assert_no_leak, flat, model_for, prompts, requests, run_with_abort
from test_decode_staging import EagerReplayGraphs

EOS = 5


def engine_for(model, K: int, **cfg) -> NativeEngine:
    cfg = {"block_size": 16, "num_continuous_decode_steps": K, **cfg}
    engine = NativeEngine(model, ByteTokenizer(), EngineConfig(**cfg), eos_token_ids=(EOS,), max_position_embeddings=1024)
    if engine._window is not None:  # count the windows that ran
        run = engine._window.run
        engine.windows = []
        engine._window.run = lambda: engine.windows.append(run()) or engine.windows[-1]
    return engine


def outputs(generations):
    return [(g.output_ids, g.output_logprobs, g.finish_reason, g.weight_version) for g in flat(generations)]


def compare(model, reqs, K: int, **cfg):
    """Generate with K = 1 and with K; assert equal outputs and no leak; return both engines."""
    single, windowed = engine_for(model, 1, **cfg), engine_for(model, K, **cfg)
    expected = outputs(single.generate(reqs))
    assert outputs(windowed.generate(reqs)) == expected
    assert sum(windowed.windows) > 0
    assert_no_leak(single)
    assert_no_leak(windowed)
    return expected, single, windowed


SAMPLINGS = {
    "greedy": dict(temperature=0.0),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "top_k": dict(temperature=1.0, top_k=20),
}


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("mode", ["invariant", "fast"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_windows_give_the_single_steps_bits(family, mode, sampling):
    model = model_for(family, mode)
    # Stop ids every 23rd token: rows stop at different steps; 13 new tokens is no multiple of 4.
    reqs = requests(prompts(5, seed=3), n=3, max_new_tokens=13, stop_token_ids=tuple(range(0, 320, 23)),
                    **SAMPLINGS[sampling])
    expected, _, _ = compare(model, reqs, 4)
    lengths = [len(ids) for ids, *_ in expected]
    assert max(lengths) == 13
    # The prefill samples token 1, windows tokens 2-5, 6-9, 10-13: a row stopped inside one.
    assert any(length < 13 and (length - 1) % 4 != 0 for length in lengths)


def test_fast_mode_drops_stopped_rows_between_eager_steps():
    """48 rows in fast mode: a GEMM over fewer rows rounds differently on CPU, so a window that
    kept computing stopped rows would differ from single steps here."""
    model = model_for("qwen3", "fast")
    reqs = requests(prompts(24, seed=3), n=2, temperature=1.0, max_new_tokens=16,
                    stop_token_ids=tuple(range(0, 320, 9)))
    expected, _, _ = compare(model, reqs, 8, max_batch_size=64)
    assert len({len(ids) for ids, *_ in expected}) > 5


@pytest.mark.parametrize("mode", ["invariant", "fast"])
def test_tiny_pool_falls_back_and_preempts_as_single_steps(mode):
    model = model_for("qwen3", mode)
    reqs = requests(prompts(6, seed=3), n=3, temperature=1.0, top_k=20, max_new_tokens=30, stop_token_ids=(3,))
    _, single, windowed = compare(model, reqs, 5, num_kv_blocks=8)
    assert windowed.scheduler.num_preemptions == single.scheduler.num_preemptions > 0
    assert not all(windowed.windows)  # some steps could not get their blocks: single steps


def test_prefix_cache_keeps_what_single_steps_keep():
    """A pool small enough that finished rows' cached blocks get evicted: windows take only blocks
    that hold no cached prefix, so the cache ends with the same entries as with single steps."""
    model = model_for("llama", "invariant")
    first = requests(prompts(4, seed=5), n=2, temperature=1.0, max_new_tokens=40)
    second = requests(prompts(4, seed=6), n=2, temperature=1.0, max_new_tokens=40, stop_token_ids=(7, 77))
    engines = [engine_for(model, K, num_kv_blocks=40) for K in (1, 6)]
    results = [outputs(e.generate(first)) + outputs(e.generate(second)) for e in engines]
    assert results[0] == results[1]
    single, windowed = engines
    assert set(windowed.blocks._cached) == set(single.blocks._cached) and single.blocks.num_cached > 0
    assert sum(windowed.windows) > 0 and not all(windowed.windows)
    assert_no_leak(windowed)


def test_windows_never_evict_cached_prefixes():
    """Once finished rows' cached blocks lead the free list, single steps evict them one by one as
    rows cross into new blocks; a window takes only blocks with no cached prefix (or shortens, or
    leaves the step to a single one), since the blocks it gives back could not be cached again."""
    model = model_for("llama", "invariant")
    engine = engine_for(model, 4, num_kv_blocks=16)
    engine.generate(requests(prompts(4, seed=5), n=2, temperature=1.0, max_new_tokens=40))
    taken, in_window = [], [False]  # (inside a window, the block taken held a cached prefix)
    allocate, run = engine.blocks.allocate, engine._window.run

    def watched_allocate():
        taken.append((in_window[0], engine.blocks.blocks[next(iter(engine.blocks._free))].hash is not None))
        return allocate()

    def watched_run():
        in_window[0] = True
        try:
            return run()
        finally:
            in_window[0] = False

    engine.blocks.allocate, engine._window.run = watched_allocate, watched_run
    engine.generate(requests(prompts(4, seed=6), n=2, temperature=1.0, max_new_tokens=40, stop_token_ids=(7, 77)))
    assert (True, False) in taken and (False, True) in taken  # windows ran; single steps evicted
    assert (True, True) not in taken
    assert_no_leak(engine)


def test_graph_path_windows_give_the_single_steps_bits():
    """Windows through the graph buffers (replayed eagerly on CPU): stopped rows keep computing at
    the same padded size and write the null block; invariant mode keeps every row's bits."""
    model = model_for("qwen3", "invariant")
    reqs = requests(prompts(6, seed=11), n=3, temperature=1.0, max_new_tokens=21, stop_token_ids=(7, 77, 100))
    expected = outputs(engine_for(model, 1).generate(reqs))
    engine = engine_for(model, 4)
    engine.runner.graphs = EagerReplayGraphs(model, engine.pool, max_batch_size=engine.cfg.max_batch_size,
                                             max_blocks_per_row=engine.blocks.blocks_for(engine.max_context_len))
    assert outputs(engine.generate(reqs)) == expected
    assert sum(engine.windows) > 0 and len(engine.runner.graphs.replayed) >= 4 * sum(engine.windows)
    assert len({len(ids) for ids, *_ in expected}) > 1
    assert_no_leak(engine)


def test_abort_mid_run_acts_at_the_window_end():
    model = model_for("llama", "invariant")
    reqs = requests(prompts(4, seed=12), n=2, temperature=1.0, max_new_tokens=30)
    full = engine_for(model, 1).generate(reqs)
    engine = engine_for(model, 4)
    got = run_with_abort(engine, reqs, 3, "r1")  # the prefill, then two windows
    assert [g.finish_reason["type"] for g in got[1]] == ["abort", "abort"]
    for aborted, whole in zip(got[1], full[1]):  # 1 + 2 windows of 4 tokens, then the abort
        assert len(aborted.output_ids) == 9 and aborted.output_ids == whole.output_ids[:9]
        assert aborted.output_logprobs == whole.output_logprobs[:9]
    assert outputs([got[0], got[2], got[3]]) == outputs([full[0], full[2], full[3]])
    assert_no_leak(engine)


def test_weight_versions_and_new_weights_between_runs():
    model = model_for("qwen3", "invariant")
    reqs = requests(prompts(4, seed=2), n=2, max_new_tokens=10)
    engines = [engine_for(model_for("qwen3", "invariant"), K) for K in (1, 3)]
    new = {name: p.detach() * 1.5 for name, p in model.named_parameters() if name.endswith("mlp.down_proj.weight")}
    results = []
    for engine in engines:
        before = outputs(engine.generate(reqs))
        engine.update_weights(new.items(), version="7")
        results.append(before + outputs(engine.generate(reqs)))
    assert results[0] == results[1] and {r[3] for r in results[1]} == {"0", "7"}


def test_stop_strings_run_single_steps():
    model = model_for("llama", "invariant")
    reqs = requests(prompts(3, seed=4), n=2, max_new_tokens=12, stop=("zz",))
    single, windowed = engine_for(model, 1), engine_for(model, 4)
    assert outputs(windowed.generate(reqs)) == outputs(single.generate(reqs))
    assert windowed.windows and not any(windowed.windows)


def test_moe_models_and_k_1_have_no_windows():
    assert engine_for(model_for("qwen3-moe"), 4)._window is None
    assert engine_for(model_for("qwen3"), 1)._window is None
    assert engine_for(model_for("qwen3"), 2)._window is not None


def test_setting_is_validated():
    with pytest.raises(ValueError, match="num_continuous_decode_steps must be >= 1, got 0"):
        EngineConfig(num_continuous_decode_steps=0)


def test_unallocate_puts_an_unused_block_back_as_it_was():
    blocks = BlockManager(4, 16)
    a = blocks.allocate()
    blocks.register([a], list(range(16)), 0, 1)
    blocks.free([a])  # cached, now at the back: [1, 2, 3, a]
    assert blocks.num_fresh(4) == 3 and blocks.num_fresh(2) == 2
    b = blocks.allocate()
    epoch = blocks.blocks[b].epoch
    blocks.unallocate(b)
    assert list(blocks._free) == [1, 2, 3, 0] and blocks.blocks[b].epoch == epoch - 1
    assert blocks.blocks[b].ref_count == 0 and blocks.num_free == 4
    assert blocks.allocate() == b


@pytest.mark.gpu
@pytest.mark.skipif(not triton_ops.available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_windows_give_the_single_steps_bits(graphs):
    """On a GPU: captured graphs (or the eager paged path) in invariant mode, K = 8 vs K = 1."""
    model = model_for("qwen3", "invariant").cuda()
    reqs = requests(prompts(24, seed=7), n=3, temperature=1.0, max_new_tokens=37, stop_token_ids=(7, 77, 100))
    _, _, windowed = compare(model, reqs, 8, block_size=64, max_batch_size=64, cuda_graphs=graphs)
    assert (windowed.runner.graphs is not None) == graphs
