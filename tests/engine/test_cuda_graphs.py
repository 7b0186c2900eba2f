"""CUDA graphs of the decode step: the captured ladder, and (GPU) replayed steps give the eager
engine's bits in invariant mode at any batch size, see new weights after `update_weights`, and
are actually used."""

from __future__ import annotations

import pytest

from miles_core.engine.native import cuda_graphs
from miles_core.engine.native.cuda_graphs import batch_size_ladder
from miles_core.kernels import triton_ops
from paged_helpers import flat, model_for, paged, prompts, requests


def test_ladder_pads_by_at_most_15_rows_and_ends_at_the_batch_limit():
    assert batch_size_ladder(1) == [1]
    assert batch_size_ladder(7) == [1, 2, 4, 7]
    assert batch_size_ladder(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    ladder = batch_size_ladder(256)
    assert ladder[:11] == batch_size_ladder(64) and ladder[-1] == 256 and len(ladder) == 23
    assert max(b - a for a, b in zip(ladder, ladder[1:])) == 16


needs_cuda = pytest.mark.skipif(not triton_ops.available(), reason="needs CUDA and Triton")


def _generate(model, graphs: bool, max_batch_size: int, prompt_ids, n=3):
    engine = paged(model, block_size=64, max_batch_size=max_batch_size, cuda_graphs=graphs)
    assert (engine.runner.graphs is not None) == graphs
    return engine, engine.generate(requests(prompt_ids, n=n, max_new_tokens=20))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("max_batch_size", [1, 7, 64])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_replayed_decode_gives_the_eager_bits(family, max_batch_size, monkeypatch):
    replays = []
    real_run = cuda_graphs.DecodeGraphs.run
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "run",
                        lambda self, *a, **kw: replays.append(len(a[0])) or real_run(self, *a, **kw))
    model = model_for(family, "invariant").cuda()
    prompt_ids = prompts(24, seed=max_batch_size)
    _, eager = _generate(model, False, max_batch_size, prompt_ids)
    _, graphed = _generate(model, True, max_batch_size, prompt_ids)
    assert replays and max(replays) <= max_batch_size
    for a, b in zip(flat(eager), flat(graphed)):
        assert a.output_ids == b.output_ids and a.output_logprobs == b.output_logprobs


@pytest.mark.gpu
@needs_cuda
def test_graphs_see_updated_weights():
    model = model_for("qwen3", "invariant").cuda()
    prompt_ids = prompts(8, seed=3)
    engine, before = _generate(model, True, 16, prompt_ids)
    new = {name: p.detach() * 1.5 for name, p in model.named_parameters() if name.endswith("mlp.down_proj.weight")}
    engine.update_weights(new.items(), version="1")
    after = engine.generate(requests(prompt_ids, n=3, max_new_tokens=20))
    _, eager = _generate(model, False, 16, prompt_ids)  # the model now holds the new weights
    assert [g.output_logprobs for g in flat(after)] == [g.output_logprobs for g in flat(eager)]
    assert [g.output_logprobs for g in flat(after)] != [g.output_logprobs for g in flat(before)]

