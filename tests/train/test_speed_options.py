"""Trainer speed options change no math: activation checkpointing (identical gradients, also for
MoE under R3 and packed rows), bf16 casts once per weight version (gradients bitwise equal to a
cast per micro-batch), the skipped old-log-prob forward (the same update as running it),
`torch.compile` (log-probs within rounding), fused/foreach AdamW, and peak-memory metrics."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from miles_core.config import AlgoConfig, ModelConfig, TrainConfig, load_config
from miles_core.checkpoint.loading import load_model
from miles_core.rl.loop import run_training
from miles_core.train.batch import TrainBatch
from miles_core.train.native import NativeTrainer
from miles_core.train.routing_replay import RoutingPlan, moe_shape
from miles_core.train.batch import response_log_probs
from tests.train.conftest import grouped_tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("MILES_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        return {s: load_model(ModelConfig(source=s, device="cpu")).model for s in ("tiny-qwen3", "tiny-qwen3-moe")}
    finally:
        patch.undo()


def _batch(model=None, seed: int = 0) -> TrainBatch:
    """3 prompts x 3 samples, response lengths 1..5, random advantages; with an MoE `model`, the
    routing of a record pass as the 'engine's' routing (for R3)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, lengths = grouped_tokens(gen)
    batch = TrainBatch(tokens=tokens, response_lengths=lengths, loss_masks=[torch.ones(r) for r in lengths],
                       advantages=[torch.randn(r, generator=gen) for r in lengths])
    if model is not None and moe_shape(model)[0]:
        plan = RoutingPlan(*moe_shape(model))
        with torch.no_grad():
            response_log_probs(model, tokens, lengths, temperature=1.0, chunk_size=8, routing=plan)
        batch.routed_experts = plan.recorded
    return batch


def _step(model, batch, **train):
    cfg = TrainConfig(lr=1e-3, max_tokens_per_micro_batch=24, **train)
    trainer = NativeTrainer(copy.deepcopy(model), cfg, AlgoConfig(entropy_coef=0.01), temperature=1.0, total_steps=2)
    return trainer, trainer.train_step(batch)


def _grads(trainer) -> list[torch.Tensor]:
    return [p.grad for p in trainer.model.parameters()]


@pytest.mark.parametrize("source", ["tiny-qwen3", "tiny-qwen3-moe"])
@pytest.mark.parametrize("layout", [dict(share_prompt_prefix=False), dict(share_prompt_prefix=True),
                                    dict(pack_sequences=True, share_prompt_prefix=True)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_checkpointing_gives_identical_gradients(models, source, layout, dtype):
    # bf16: the recomputation in backward runs after the cast weights were swapped out again; it
    # must see the same bf16 tensors (a first version recomputed with the fp32 masters and failed)
    model = models[source]
    replay = dict(routing_replay="rollout") if moe_shape(model)[0] else {}
    plain, m_plain = _step(model, _batch(model), compute_dtype=dtype, **layout, **replay)
    ckpt, m_ckpt = _step(model, _batch(model), activation_checkpointing=True, compute_dtype=dtype, **layout, **replay)
    assert m_ckpt == m_plain
    for a, b in zip(_grads(plain), _grads(ckpt)):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("pack", [False, True])
def test_one_cast_per_step_gives_the_gradients_of_a_cast_per_micro_batch(models, monkeypatch, pack):
    # bf16 compute over several micro-batches: the cached leaves + fold_grads against the
    # differentiable per-micro-batch cast (CastCache.get replaced by a fresh cast every call).
    batch = _batch()
    cached, m_cached = _step(models["tiny-qwen3"], batch, compute_dtype="bfloat16", pack_sequences=pack)
    assert len(cached._micro_batches(batch)) > 1
    monkeypatch.setattr("miles_core.train.native.CastCache.get", lambda self, module, dtype, keep: {
        name: p.to(dtype) for name, p in module.named_parameters() if p.dtype != dtype and not name.endswith(keep)})
    percall, m_percall = _step(models["tiny-qwen3"], batch, compute_dtype="bfloat16", pack_sequences=pack)
    assert m_cached == m_percall
    for a, b in zip(_grads(cached), _grads(percall)):
        assert torch.equal(a, b)
    for a, b in zip(cached.model.parameters(), percall.model.parameters()):
        assert torch.equal(a, b)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_every_optimizer_step_trains_on_the_updated_weights(models, device):
    # Two training steps with no no-grad pass between (the default loop: one step per rollout, no
    # KL): the cast cache sees the new weights only through their version counters, which the
    # fused AdamW of CUDA does not bump by itself (it trained on the first casts before the fix).
    trainer, first = _step(copy.deepcopy(models["tiny-qwen3"]).to(device), _batch(), compute_dtype="bfloat16")
    _, expected = _step(trainer.model, _batch(), compute_dtype="bfloat16")  # a fresh trainer at the new weights
    second = trainer.train_step(_batch())
    assert second["entropy_loss"] != first["entropy_loss"]
    assert (second["entropy_loss"], second["pg_loss"]) == (expected["entropy_loss"], expected["pg_loss"])


@pytest.mark.parametrize("device", DEVICES)
def test_cast_cache_is_remade_after_the_weights_change(models, device):
    trainer, _ = _step(copy.deepcopy(models["tiny-qwen3"]).to(device), _batch(), compute_dtype="bfloat16")
    first = trainer.compute_log_probs(_batch())
    again = trainer.compute_log_probs(_batch())
    trainer.train_step(_batch(seed=1))  # the optimizer step bumps every master's version
    after = trainer.compute_log_probs(_batch())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, after))


def test_skipped_old_log_prob_forward_gives_the_same_update(models):
    # One optimizer step per rollout: old log-probs taken from the training forward (skipped pass)
    # against a separate no-grad pass that computes them first.
    skipped = NativeTrainer(copy.deepcopy(models["tiny-qwen3"]), TrainConfig(lr=1e-3), AlgoConfig(),
                            temperature=1.0, total_steps=2)
    computed = NativeTrainer(copy.deepcopy(models["tiny-qwen3"]), TrainConfig(lr=1e-3), AlgoConfig(),
                             temperature=1.0, total_steps=2)
    batch_a, batch_b = _batch(), _batch()
    batch_b.old_log_probs = computed.compute_log_probs(batch_b)
    m_skipped, m_computed = skipped.train_rollout(batch_a), computed.train_rollout(batch_b)
    assert batch_a.old_log_probs is None  # no pass was run
    assert m_skipped["pg_loss"] == m_computed["pg_loss"] and m_skipped["grad_norm"] == m_computed["grad_norm"]
    for a, b in zip(skipped.model.parameters(), computed.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_keeps_the_log_probs(models):
    eager, _ = _step(models["tiny-qwen3"], _batch(), pack_sequences=True)
    compiled, _ = _step(models["tiny-qwen3"], _batch(), pack_sequences=True, compile=True)
    for a, b in zip(eager.compute_log_probs(_batch(seed=2)), compiled.compute_log_probs(_batch(seed=2))):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_run_metrics_report_peak_memory(tmp_path):
    run_training(load_config("tiny", ["loop.num_rollout=1"]), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["perf/peak_cpu_rss_gb"] > 0
    assert ("perf/peak_gpu_memory_gb" in record) == torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_and_speed_options_on_cuda(models):
    model = copy.deepcopy(models["tiny-qwen3"]).cuda()
    batch = _batch()
    ref, m_ref = _step(model, batch, compute_dtype="bfloat16")
    fast, m_fast = _step(model, batch, compute_dtype="bfloat16", pack_sequences=True, activation_checkpointing=True)
    assert fast.optimizer.defaults["fused"]
    assert m_fast["pg_loss"] == pytest.approx(m_ref["pg_loss"], abs=1e-2)
    assert m_fast["grad_norm"] == pytest.approx(m_ref["grad_norm"], rel=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_packed_layers_on_cuda_are_one_graph_with_the_eager_update(models, checkpointing):
    # Packed attention (variable-length flash) and the fused elementwise ops are traced into the
    # layer's graph: no graph break; loss and gradient norm as the eager trainer's (bf16 rounding).
    from torch._dynamo.utils import counters

    model = copy.deepcopy(models["tiny-qwen3"]).cuda()
    batch = _batch()
    _, m_eager = _step(model, batch, compute_dtype="bfloat16", pack_sequences=True)
    counters.clear()
    _, m_compiled = _step(model, batch, compute_dtype="bfloat16", pack_sequences=True, compile=True,
                          activation_checkpointing=checkpointing)
    assert dict(counters["graph_break"]) == {}
    assert m_compiled["pg_loss"] == pytest.approx(m_eager["pg_loss"], abs=1e-2)
    assert m_compiled["grad_norm"] == pytest.approx(m_eager["grad_norm"], rel=5e-2)
