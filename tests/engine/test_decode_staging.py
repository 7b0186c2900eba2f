"""The decode step's host path, on CPU: `stage_decode_inputs` packs what the per-row packing it
replaced packed, and the graph path (staging, padding to the ladder, the decode fast paths of
scheduler and engine) gives the eager engine's bits in invariant mode with rows joining,
leaving, forking, stopping, aborting and being preempted; sampling tensors kept between steps;
`generate` answering finished requests after the next forward's launch. The captured graph is replaced by an
eager forward over the staged buffers (`EagerReplayGraphs`): on CPU there is nothing to capture,
and what is tested here is every input the graph would read."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from miles_core.engine.native import paged_cache
from miles_core.engine.native.cuda_graphs import DecodeGraphs, stage_decode_inputs
from miles_core.kernels import model_ops
from paged_helpers import assert_no_leak, flat, model_for, paged, prompts, reference, requests, run_with_abort


class _Seq:
    def __init__(self, token_ids, block_table):
        self.token_ids, self.block_table = token_ids, block_table


def per_row_packing(seqs, block_size, null_block, size, num_columns):
    """The packing `stage_decode_inputs` replaced: one row at a time from Python lists."""
    packed = np.empty((size, num_columns), dtype=np.int64)
    packed[:, 0], packed[:, 1], packed[:, 2], packed[:, 3:] = 0, 0, null_block * block_size, null_block
    for b, seq in enumerate(seqs):
        p = len(seq.token_ids) - 1
        table = seq.block_table[: p // block_size + 1]
        packed[b, :3] = seq.token_ids[p], p, table[-1] * block_size + p % block_size
        packed[b, 3 : 3 + len(table)] = table
    return packed


@pytest.mark.parametrize("batch,size", [(1, 1), (5, 8), (127, 128), (128, 128), (3, 16)])
def test_staging_equals_the_per_row_packing(batch, size):
    rng = random.Random(batch)
    P, M, null = 16, 6, 999
    seqs = []
    for _ in range(batch):
        length = rng.randint(1, P * M)
        needed = (length - 1) // P + 1
        extra = rng.randint(0, M - needed) if batch % 2 else 0  # blocks past the position's (admission)
        seqs.append(_Seq([rng.randrange(500) for _ in range(length)], rng.sample(range(900), needed + extra)))
    buffer = np.full(size * (3 + M), -1, dtype=np.int64)  # stale contents must all be overwritten
    got = stage_decode_inputs(seqs, P, null, size, buffer)
    expected = per_row_packing(seqs, P, null, size, 3 + M)
    W = max((len(seq.token_ids) - 1) // P + 1 for seq in seqs)  # the columns some row reads
    assert got.shape == (size, 3 + W) and np.shares_memory(got, buffer)
    assert np.array_equal(got, expected[:, : 3 + W]) and (expected[:, 3 + W :] == null).all()


class _EagerReplay:
    def __init__(self, graphs: EagerReplayGraphs, size: int) -> None:
        self.graphs, self.size = graphs, size

    def replay(self) -> None:
        self.graphs.replayed.append(self.size)
        self.graphs.logits[self.size].copy_(self.graphs.eager_forward(self.size))


class EagerReplayGraphs(DecodeGraphs):
    """`DecodeGraphs` whose replay runs the model eagerly on the staged buffers (dense keys
    gathered through the staged block tables, as on CPU)."""

    def _capture(self) -> None:
        self._ops = model_ops(self.model)
        vocab = self.model.lm_head.weight.shape[0]
        self.replayed = getattr(self, "replayed", [])
        self.graphs = {size: _EagerReplay(self, size) for size in self.sizes}
        self.logits = {size: torch.empty(size, vocab) for size in self.sizes}

    def eager_forward(self, size: int) -> torch.Tensor:
        positions = self.positions_G1[:size]
        num_keys = int(positions.max()) + 1
        cache = paged_cache.PagedKVCache(self.pool, self.tables_GM[:size], self.slots_G[:size], None, num_keys)
        return self.model.lm_head(self.model(self.ids_G1[:size], positions, cache, routing=None)[:, 0])


def graphed(model, **cfg):
    engine = paged(model, return_routed_experts=False, **cfg)
    engine.runner.graphs = EagerReplayGraphs(model, engine.pool, max_batch_size=engine.cfg.max_batch_size,
                                             max_blocks_per_row=engine.blocks.blocks_for(engine.max_context_len))
    return engine


@pytest.mark.parametrize("forcing", [dict(block_size=16), dict(block_size=16, num_kv_blocks=8),
                                     dict(block_size=16, max_batch_size=5, max_num_batched_tokens=20)])
def test_graph_path_gives_the_eager_bits(forcing):
    model = model_for("qwen3", "invariant")
    reqs = requests(prompts(6, seed=11), n=3, stop_token_ids=(7, 77), max_new_tokens=40)  # some stop early
    eager = paged(model, return_routed_experts=False, **forcing)
    expected = eager.generate(reqs)
    engine = graphed(model, **forcing)
    got = engine.generate(reqs)
    assert len(engine.runner.graphs.replayed) > 20
    assert [g.output_ids for g in flat(got)] == [g.output_ids for g in flat(expected)]
    assert [g.output_logprobs for g in flat(got)] == [g.output_logprobs for g in flat(expected)]
    assert [g.finish_reason for g in flat(got)] == [g.finish_reason for g in flat(expected)]
    assert len({len(g.output_ids) for g in flat(got)}) > 1  # rows left the batch at different steps
    if "num_kv_blocks" in forcing:
        assert engine.scheduler.num_preemptions == eager.scheduler.num_preemptions > 0
    assert_no_leak(engine)


def test_graph_path_with_abort_and_changing_sampling_settings():
    """An abort mid-decode and a second batch with another temperature (the engine keeps the
    sampling tensors of one setting between steps) give what fresh eager engines give."""
    model = model_for("llama", "invariant")
    first = requests(prompts(4, seed=12), n=2, max_new_tokens=30)
    second = requests(prompts(4, seed=13), n=2, temperature=1.3, max_new_tokens=30)
    engine = graphed(model, block_size=16)
    got = run_with_abort(engine, first, 6, "r1")
    assert [g.finish_reason["type"] for g in got[1]] == ["abort", "abort"]
    eager = paged(model, return_routed_experts=False, block_size=16)
    expected = eager.generate([first[0], first[2], first[3]])
    assert [g.output_logprobs for g in flat([got[0], got[2], got[3]])] == [g.output_logprobs for g in flat(expected)]
    again = engine.generate(second)
    fresh = paged(model, return_routed_experts=False, block_size=16).generate(second)
    assert [g.output_logprobs for g in flat(again)] == [g.output_logprobs for g in flat(fresh)]
    assert_no_leak(engine)


def test_sampling_settings_equal_by_value_share_kept_tensors_and_mixed_settings_stay_per_row():
    """Requests with equal but distinct sampling configs sample as one shared config does (the
    engine keeps one set of tensors); mixed temperatures and top-k give each request what it
    gets alone (the reference engine draws from torch's generators)."""
    model = model_for("qwen3", "invariant")
    shared = requests(prompts(4, seed=14), n=2, max_new_tokens=15)
    distinct = [replace(r, sampling=replace(r.sampling)) for r in shared]
    assert distinct[0].sampling is not distinct[1].sampling and distinct[0].sampling == distinct[1].sampling
    engine = paged(model, block_size=16)
    got = engine.generate(distinct)
    (_, rows, _), (temperature_B, top_k_B, top_p_B, flags) = engine._sampling_params._kept
    assert rows == 8 and torch.equal(temperature_B, torch.full((8,), 0.8))
    assert (flags.filtered, flags.greedy, flags.scaled) == (False, False, True)
    assert torch.equal(top_k_B, torch.full((8,), -1)) and torch.equal(top_p_B, torch.ones(8))
    assert [g.output_logprobs for g in flat(got)] == [g.output_logprobs for g in flat(paged(model).generate(shared))]
    mixed = [replace(r, sampling=replace(r.sampling, temperature=0.5 + 0.3 * i, top_k=4 if i % 2 else -1))
             for i, r in enumerate(shared)]
    together = engine.generate(mixed)
    alone = [reference(model).generate([r])[0] for r in mixed]
    assert [g.output_logprobs for g in flat(together)] == [g.output_logprobs for g in flat(alone)]
    assert [g.output_ids for g in flat(together)] == [g.output_ids for g in flat(alone)]


class _RecordingTokenizer:
    """Decodes nothing; notes when the engine builds an answer (it decodes the response text)."""

    def __init__(self, events: list) -> None:
        self.events = events

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.events.append("answer")
        return ""


def test_generate_answers_finished_requests_right_after_the_next_forward_launch():
    model = model_for("llama", "invariant")
    reqs = [*requests(prompts(3, seed=15), n=1, max_new_tokens=4), *requests(prompts(1, seed=16), n=1, max_new_tokens=9)]
    events = []
    engine = paged(model, block_size=16)
    engine.tokenizer = _RecordingTokenizer(events)
    real_forward = engine.runner.forward
    engine.runner.forward = lambda rows, **kw: events.append("forward") or real_forward(rows, **kw)
    got = engine.generate(reqs)
    # The three short requests finish in the 4th step's sampling and are answered after the 5th
    # forward's launch; the long one after the 9th step, when no forward is left (the idle step).
    assert events == ["forward"] * 5 + ["answer"] * 3 + ["forward"] * 4 + ["answer"]
    expected = paged(model, block_size=16).generate(reqs)
    assert [g.output_logprobs for g in flat(got)] == [g.output_logprobs for g in flat(expected)]
    assert not engine._finished and engine._num_answering_late == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_a_late_answer_carries_the_weight_version_its_request_finished_under(overlap):
    model = model_for("llama", "invariant")
    short, long = requests(prompts(2, seed=17), n=2, max_new_tokens=3)
    long = replace(long, sampling=replace(long.sampling, max_new_tokens=8))
    engine = paged(model, block_size=16, overlap="on" if overlap else "off")
    engine._num_answering_late += 1  # what `generate` does while it steps
    first, second = engine.submit(short), engine.submit(long)
    while not all(seq.done for seq in first.sequences):
        engine.step()
    # Answered after the next forward's launch: in the next step, or (overlap) in the step that
    # read the last tokens, which launches the next forward first.
    assert first.done == overlap
    weight = model.model.norm.weight
    engine.update_weights([("model.norm.weight", weight.detach() * 1.0)], version="1")
    engine.step()
    assert first.done and [g.weight_version for g in first.result()] == ["0", "0"]
    while engine.step():
        pass
    assert second.done and [g.weight_version for g in second.result()] == ["1", "1"]
    assert_no_leak(engine)
