"""Control and sampling of the paged engine: abort, pause/resume, submission from other threads
with the background loop, sizing errors and config validation, and sampled-token frequencies
against the sampling distribution (chi-square)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from miles_core.config import EngineConfig, SamplingConfig
from miles_core.engine.native import NativeEngine
from miles_core.engine.protocol import GenerateRequest
from miles_core.engine.sampler import process_logits
from miles_core.errors import MilesError
from paged_helpers import ByteTokenizer, assert_no_leak, flat, model_for, paged, prompts, reference, requests


def test_abort_finishes_the_request_and_frees_its_blocks():
    model = model_for("qwen3", "invariant")
    engine = paged(model, block_size=16)
    keep, drop = requests(prompts(2, seed=1), n=2, max_new_tokens=20)
    kept, dropped = engine.submit(keep), engine.submit(drop)
    for _ in range(4):
        engine.step()
    engine.abort(drop.rid)
    while not kept.done:
        engine.step()
    assert dropped.done
    for gen in dropped.result():
        assert gen.finish_reason == {"type": "abort", "message": "aborted by request"}
        assert len(gen.output_ids) < 20
    assert [g.output_ids for g in kept.result()] == [g.output_ids for g in reference(model).generate([keep])[0]]
    assert_no_leak(engine)


def test_abort_before_admission_and_of_unknown_rids():
    engine = paged(model_for("llama"), block_size=16)
    handle = engine.submit(requests(prompts(1), n=3)[0])
    engine.abort("r0")
    engine.abort("nobody")
    engine.step()
    assert [g.finish_reason["type"] for g in handle.result(timeout=0)] == ["abort"] * 3
    assert_no_leak(engine)


def test_pause_stops_stepping_until_resume():
    engine = paged(model_for("llama"), block_size=16)
    handle = engine.submit(requests(prompts(1), n=1, max_new_tokens=3)[0])
    engine.pause()
    assert engine.health() is False and engine.step() is False
    engine.resume()
    while engine.step():
        pass
    assert handle.done and len(handle.result()[0].output_ids) == 3


def test_background_loop_serves_submissions_from_other_threads():
    model = model_for("qwen3-moe", "invariant")
    reqs = requests(prompts(4, seed=2), n=2)
    engine = paged(model, block_size=16)
    engine.start()
    try:
        handles: list = [None] * len(reqs)

        def client(i):
            handles[i] = engine.submit(reqs[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = [h.result(timeout=60) for h in handles]
        again = engine.generate(reqs)  # generate waits on the loop too
        assert [(g.output_ids, g.output_logprobs) for g in flat(again)] == \
            [(g.output_ids, g.output_logprobs) for g in flat(got)]
    finally:
        engine.stop()
    expected = reference(model).generate(reqs)
    assert [g.output_ids for g in flat(got)] == [g.output_ids for g in flat(expected)]
    assert_no_leak(engine)


def test_a_sequence_that_cannot_fit_is_refused_with_the_numbers():
    engine = paged(model_for("llama"), block_size=16, num_kv_blocks=2)
    req = GenerateRequest(input_ids=list(range(30)), sampling=SamplingConfig(max_new_tokens=10), rid="big")
    with pytest.raises(MilesError) as err:
        engine.generate([req])
    assert str(err.value) == ("request 'big' needs 3 KV blocks of 16 tokens (30 prompt + 10 new); the pool has 2 "
                              "(raise engine.num_kv_blocks or engine.mem_fraction)")


def test_cpu_pool_is_sized_for_the_batch():
    engine = paged(model_for("llama"), max_batch_size=4, max_context_len=100)
    assert engine.blocks.num_blocks == 4 * 2  # 100 tokens -> 2 blocks of 64, for 4 sequences


@pytest.mark.parametrize("field, value, message", [
    ("mem_fraction", 0.0, "mem_fraction must be in (0, 1], got 0.0"),
    ("mem_fraction", 1.5, "mem_fraction must be in (0, 1], got 1.5"),
    ("num_kv_blocks", -1, "num_kv_blocks must be >= 0, got -1"),
    ("block_size", 48, "block_size must be a power of two >= 16, got 48"),
    ("block_size", 8, "block_size must be a power of two >= 16, got 8"),
    ("max_num_batched_tokens", 0, "max_num_batched_tokens must be >= 1, got 0"),
])
def test_engine_config_validation(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        EngineConfig(**{field: value})


class FixedLogits(nn.Module):
    """Stand-in model: the same logits after every prefix."""

    def __init__(self, logits_V: torch.Tensor) -> None:
        super().__init__()
        self.args = SimpleNamespace(num_hidden_layers=1)
        self.lm_head = nn.Linear(1, logits_V.shape[0], bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(logits_V[:, None])

    def forward(self, input_ids_BT, position_ids_BT, kv_cache=None, routing=None):
        return torch.ones(*input_ids_BT.shape, 1)

    def kv_cache_dims(self):
        return 1, 1, 1


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=6),
                                      dict(temperature=1.3, top_p=0.8), dict(temperature=0.9, top_k=8, top_p=0.9)])
def test_sampled_frequencies_match_the_distribution(sampling):
    """Chi-square goodness of fit over 4000 draws (500 requests x 8 samples): fails a correct
    sampler with probability 1e-4, and a sampler with a 1.5% shift in any bin almost surely."""
    logits = torch.randn(12, generator=torch.Generator().manual_seed(0)) * 1.5
    model = FixedLogits(logits)
    engine = NativeEngine(model, ByteTokenizer(), EngineConfig(max_batch_size=64), eos_token_ids=(),
                          max_position_embeddings=64)
    cfg = SamplingConfig(max_new_tokens=1, n_samples_per_prompt=8, **sampling)
    outputs = engine.generate([GenerateRequest([1, 2, 3], cfg, seed=s) for s in range(500)])
    tokens = torch.tensor([g.output_ids[0] for g in flat(outputs)])
    probs = torch.softmax(process_logits(logits[None], torch.tensor([cfg.temperature]), torch.tensor([cfg.top_k]),
                                         torch.tensor([cfg.top_p]))[0], dim=-1).double()
    support = probs > 0
    counts = torch.bincount(tokens, minlength=12).double()
    assert counts[~support].sum() == 0  # filtered tokens are never drawn
    expected = probs[support] * len(tokens)
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    # p-value: the chi-square survival function, Q(k/2, x/2) (regularised upper incomplete gamma)
    dof = int(support.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(chi2 / 2)))
    assert p_value > 1e-4, (chi2, dof, p_value)
    # The logprob reported is that of the distribution sampled from.
    gen = flat(outputs)[0]
    assert gen.output_logprobs[0] == pytest.approx(float(probs[gen.output_ids[0]].log()), abs=1e-6)
