"""MoE routing capture in the engine and Rollout Routing Replay (R3) in the trainer, for the
tiny Qwen3-MoE and DeepSeek-V3 (MLA + MTP weights) built-ins: shapes, replay really used,
agreement below 100% under a perturbation without R3, router gradients under replay, JSONL
round trip, shape errors, `record` mode, zero KL in invariant mode, and both recipes end to end."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.config import AlgoConfig, EngineConfig, ModelConfig, SamplingConfig, TrainConfig, load_config
from miles_core.engine.native import NativeEngine
from miles_core.engine.protocol import GenerateRequest
from miles_core.errors import MilesError
from miles_core.algo.mismatch import MismatchSums
from miles_core.checkpoint.loading import load_model
from miles_core.models.routing import RoutingContext
from miles_core.sample import Sample, read_samples_jsonl, write_samples_jsonl
from miles_core.train.batch import TrainBatch
from miles_core.train.native import NativeTrainer

SOURCES = ("tiny-qwen3-moe", "tiny-deepseek-v3")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("MILES_CACHE", str(path))
    yield path
    patch.undo()


def _load(source: str, mode: str = "fast"):
    return load_model(ModelConfig(source=source, device="cpu"), alignment_mode=mode)


def _rollout(loaded, batch_size: int = 16, count: int = 6, seed: int = 0) -> list[Sample]:
    engine = NativeEngine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=batch_size, return_routed_experts=True),
                          eos_token_ids=(), max_position_embeddings=1024)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in torch.randint(3, 25, (count,), generator=gen)]
    outputs = engine.generate([GenerateRequest(input_ids=p, sampling=SamplingConfig(max_new_tokens=6, n_samples_per_prompt=2),
                                               seed=i) for i, p in enumerate(prompts)])
    return [Sample(tokens=p + o.output_ids, response_length=len(o.output_ids), rollout_log_probs=o.output_logprobs,
                   rollout_routed_experts=o.routed_experts, loss_mask=[1] * len(o.output_ids))
            for p, group in zip(prompts, outputs) for o in group]


def _trainer(model, **train) -> NativeTrainer:
    train = {"lr": 1e-3, "max_tokens_per_micro_batch": 120, **train}
    return NativeTrainer(copy.deepcopy(model), TrainConfig(**train), AlgoConfig(), temperature=1.0, total_steps=4)


def _batch(samples, advantage: float = 0.0) -> TrainBatch:
    return TrainBatch.from_samples(samples, [torch.full((s.response_length,), advantage * (-1) ** i)
                                             for i, s in enumerate(samples)])


def _perturbed(model, scale: float = 0.05):
    """A 'fast mode' trainer whose routers differ slightly from the engine's."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    return model


def _gap(trainer, samples) -> tuple[dict, float]:
    sums = MismatchSums()
    for logp, s in zip(trainer.compute_log_probs(_batch(samples)), samples):
        sums.add(logp, torch.tensor(s.rollout_log_probs))
    return sums.metrics(), trainer.last_pass_metrics()["routing_agreement"]


@pytest.mark.parametrize("source", SOURCES)
def test_engine_records_every_token_of_every_moe_layer(cache, source):
    loaded = _load(source)
    samples = _rollout(loaded)
    layers, topk = loaded.model.num_moe_layers, loaded.model.args.num_experts_per_tok
    for s in samples:
        assert s.rollout_routed_experts.dtype == np.int32
        assert s.rollout_routed_experts.shape == (len(s.tokens) - 1, layers, topk)
    # the recorded routing is what the model's routers choose on the same tokens in one forward
    ctx = RoutingContext("record")
    tokens = torch.tensor([samples[0].tokens])
    with torch.no_grad():
        loaded.model(tokens, torch.arange(tokens.shape[1])[None], routing=ctx)
    forward = ctx.stacked()[0, :-1]
    assert (np.sort(forward, -1) == np.sort(samples[0].rollout_routed_experts, -1)).mean() == 1.0


@pytest.mark.parametrize("source", SOURCES)
def test_replay_uses_exactly_the_engines_experts(cache, source, monkeypatch):
    loaded = _load(source)
    samples = _rollout(loaded)
    used: list[torch.Tensor] = []
    original = RoutingContext.route

    def spy(self, layer, chosen):
        ids = original(self, layer, chosen)
        if self.mode == "replay":
            used.append((layer, ids.clone()))
        return ids

    monkeypatch.setattr(RoutingContext, "route", spy)
    trainer = _trainer(_perturbed(loaded.model), routing_replay="rollout", share_prompt_prefix=False,
                       max_tokens_per_micro_batch=100_000)
    batch = _batch(samples)
    trainer.compute_log_probs(batch)
    (rows,) = trainer._micro_batches(batch)  # one micro-batch; its rows are in packing order
    assert len(used) == loaded.model.num_moe_layers
    for layer, ids_BTK in used:
        for b, index in enumerate(rows):
            s = samples[index]
            assert torch.equal(ids_BTK[b, : len(s.tokens) - 1].to(torch.int32),
                               torch.from_numpy(s.rollout_routed_experts[:, layer]))


@pytest.mark.parametrize("source", SOURCES)
def test_without_replay_a_perturbed_trainer_disagrees_and_replay_narrows_the_gap(cache, source):
    loaded = _load(source)
    samples = _rollout(loaded, count=8)
    perturbed = _perturbed(loaded.model)
    off, agreement_off = _gap(_trainer(perturbed, routing_replay="off"), samples)
    r3, agreement_r3 = _gap(_trainer(perturbed, routing_replay="rollout"), samples)
    assert 0.5 < agreement_off < 1.0  # reported, and below 100%
    assert r3["mean_abs_diff"] < off["mean_abs_diff"]
    same, agreement_same = _gap(_trainer(loaded.model), samples)
    assert agreement_same == 1.0 and same["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("source", SOURCES)
def test_router_gets_a_gradient_under_replay(cache, source):
    loaded = _load(source)
    trainer = _trainer(loaded.model, routing_replay="rollout")
    trainer.train_step(_batch(_rollout(loaded), advantage=1.0))
    params = dict(trainer.model.named_parameters())
    # the routers of the MoE layers the forward runs (DeepSeek's MTP layer is not run)
    grads = [params[f"model.layers.{i}.mlp.gate.weight"].grad for i in trainer.model.moe_layers]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_replay_data_survives_jsonl(cache, tmp_path):
    loaded = _load("tiny-deepseek-v3")
    samples = _rollout(loaded)
    write_samples_jsonl(samples, tmp_path / "r.jsonl")
    back = list(read_samples_jsonl(tmp_path / "r.jsonl"))
    assert all(np.array_equal(a.rollout_routed_experts, b.rollout_routed_experts) for a, b in zip(samples, back))
    perturbed = _perturbed(loaded.model)
    direct = _trainer(perturbed, routing_replay="rollout").compute_log_probs(_batch(samples))
    reread = _trainer(perturbed, routing_replay="rollout").compute_log_probs(_batch(back))
    assert all(torch.equal(a, b) for a, b in zip(direct, reread))


def test_mismatched_routing_shape_is_a_clear_error(cache):
    loaded = _load("tiny-qwen3-moe")
    samples = _rollout(loaded)
    samples[1].rollout_routed_experts = samples[1].rollout_routed_experts[:, :, :1]
    with pytest.raises(MilesError) as err:
        _trainer(loaded.model, routing_replay="rollout").compute_log_probs(_batch(samples))
    shape = samples[1].rollout_routed_experts.shape
    assert str(err.value) == (f"sample 1: routed experts have shape {shape}, expected {shape[:2] + (2,)} "
                              "(len(tokens) - 1, MoE layers, top-k)")


def test_record_mode_replays_the_first_pass_in_later_steps(cache):
    loaded = _load("tiny-qwen3-moe")
    samples = _rollout(loaded)
    trainer = _trainer(_perturbed(loaded.model), routing_replay="record", num_steps_per_rollout=2)
    batch = _batch(samples, advantage=1.0)
    metrics = trainer.train_rollout(batch)
    assert batch.trainer_routed_experts is not None
    assert all(r.shape == s.rollout_routed_experts.shape for r, s in zip(batch.trainer_routed_experts, samples))
    assert 0 < metrics["routing_agreement"] < 1.0


@pytest.mark.parametrize("source", SOURCES)
def test_invariant_mode_gives_zero_kl_for_moe(cache, source):
    loaded = _load(source, "invariant")
    for batch_size in (1, 5, 16):
        stats, agreement = _gap(_trainer(loaded.model), _rollout(loaded, batch_size=batch_size))
        assert stats["kl_k3"] == 0.0 and stats["bitwise_equal"] == 1.0 and agreement == 1.0


def test_rollout_replay_requires_routing_capture():
    with pytest.raises(MilesError, match="set engine.return_routed_experts = true"):
        load_config("tiny-moe", ["engine.return_routed_experts=false"])


@pytest.mark.parametrize("recipe", ["tiny-moe", "tiny-deepseek"])
def test_moe_recipes_train_with_r3(cache, tmp_path, monkeypatch, recipe):
    (tmp_path / "length_reward.py").write_text("def reward(sample):\n    return len(sample.response) / 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--recipe", recipe, "--output-dir", str(out),
                                      "--set", "reward.type=length_reward:reward"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "train/grad_norm" in r]
    assert len(trained) == 2
    assert all(r["train/routing_agreement"] == 1.0 and r["train/grad_norm"] > 0 for r in trained)
    assert (out / "checkpoints" / "step_000002" / "config.json").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("source", SOURCES)
def test_invariant_mode_gives_zero_kl_for_moe_on_cuda(cache, source):
    loaded = load_model(ModelConfig(source=source, device="cuda", dtype="bfloat16"), alignment_mode="invariant")
    for batch_size in (1, 16):
        samples = _rollout(loaded, batch_size=batch_size)
        trainer = NativeTrainer(copy.deepcopy(loaded.model), TrainConfig(compute_dtype="bfloat16"), AlgoConfig(),
                                temperature=1.0, total_steps=1)
        stats, agreement = _gap(trainer, samples)
        assert stats["kl_k3"] == 0.0 and stats["bitwise_equal"] == 1.0 and agreement == 1.0, (batch_size, stats)
