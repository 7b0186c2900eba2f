"""`train.backend = "megatron"` on CPU (one gloo rank, fp32): megatron-core's GPTModel holding the
native model's weights gives the native trainer's log-probs, loss and update; its HF export is
the weights it was given, bit for bit; its torch_dist checkpoint resumes training exactly and
converts with `miles convert`; `miles train` runs with it and logs the native backend's numbers."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the optional [megatron] extra)")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

from miles_cli.app import app  # noqa: E402
from miles_core.checkpoint.convert import convert  # noqa: E402
from miles_core.checkpoint.hf import iter_state_dict  # noqa: E402
from miles_core.config import AlgoConfig, TrainConfig  # noqa: E402
from miles_core.errors import MilesError  # noqa: E402
from miles_core.metrics import read_metrics  # noqa: E402
from miles_core.models.base import named_weights  # noqa: E402
from miles_core.models.registry import build_model  # noqa: E402
from miles_core.models.tiny import TINY_DEEPSEEK_V3_CONFIG, TINY_QWEN3_CONFIG, TINY_QWEN3_MOE_CONFIG  # noqa: E402
from miles_core.train import build_trainer, megatron_env  # noqa: E402
from miles_core.train.batch import TrainBatch  # noqa: E402

CONFIGS = {
    "llama": {**TINY_QWEN3_CONFIG, "model_type": "llama", "tie_word_embeddings": True},
    "qwen2": {**TINY_QWEN3_CONFIG, "model_type": "qwen2"},
    "qwen3": TINY_QWEN3_CONFIG,
    "qwen3_moe": TINY_QWEN3_MOE_CONFIG,
    "deepseek_v3": TINY_DEEPSEEK_V3_CONFIG,  # MLA, sigmoid group-limited router, shared expert, MTP
}
RESPONSE_LENGTHS = [5, 3, 7, 4]
ADVANTAGES = [1.0, -1.0, 0.5, -0.5]


@pytest.fixture(scope="module", autouse=True)
def megatron_process_state():
    """Leave no process group or CPU patch behind for the other test modules."""
    yield
    megatron_env.shutdown()


def native(family: str, **changes) -> torch.nn.Module:
    """A native fp32 model with every weight random (biases and norms too, norms near 1); `changes`
    to the family's config (e.g. `tie_word_embeddings`)."""
    model = build_model({**CONFIGS[family], **changes}).float()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in named_weights(model):
            if "norm" in name:
                tensor.uniform_(0.5, 1.5, generator=generator)
            else:
                tensor.normal_(0.0, 0.5 if name.endswith("mlp.gate.weight") else 0.05, generator=generator)
    return model


def batch() -> TrainBatch:
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 300, (n,), generator=generator) for n in (12, 9, 15, 12)]
    return TrainBatch(tokens=tokens, response_lengths=RESPONSE_LENGTHS,
                      loss_masks=[torch.ones(r) for r in RESPONSE_LENGTHS],
                      advantages=[torch.full((r,), a) for r, a in zip(RESPONSE_LENGTHS, ADVANTAGES)])


def trainers(family: str, cfg: TrainConfig = TrainConfig(lr=1e-4), algo: AlgoConfig = AlgoConfig()):
    model = native(family)
    kwargs = dict(temperature=1.0, total_steps=4)
    return (build_trainer(cfg, algo, copy.deepcopy(model), **kwargs),
            build_trainer(replace(cfg, backend="megatron"), algo, copy.deepcopy(model), **kwargs))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_export_is_the_native_weights_bitwise(family):
    model = native(family)
    trainer = build_trainer(TrainConfig(backend="megatron"), AlgoConfig(), copy.deepcopy(model),
                            temperature=1.0, total_steps=1)
    exported, expected = dict(trainer.export_weights()), dict(named_weights(model))
    assert exported.keys() == expected.keys()  # tied llama: the embedding once, no lm_head
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("family", list(CONFIGS))
def test_log_probs_match_native(family):
    ours, theirs = trainers(family)
    for a, b in zip(ours.compute_log_probs(batch()), theirs.compute_log_probs(batch())):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_bf16_compute_matches_native_bf16_within_bf16_rounding(family):
    """`train.compute_dtype = "bfloat16"`: the parameters cast for the forward as the native trainer
    casts them (DeepSeek-V3's router stays fp32), so both agree to bf16 rounding: log-probs of
    magnitude ~6 within 3e-2 (a few bf16 ulps), and one step's loss and gradient norm."""
    ours, theirs = trainers(family, TrainConfig(lr=1e-4, compute_dtype="bfloat16"))
    exact, _ = trainers(family)
    bf16 = theirs.compute_log_probs(batch())
    for a, b, c in zip(ours.compute_log_probs(batch()), bf16, exact.compute_log_probs(batch())):
        torch.testing.assert_close(b, a, atol=3e-2, rtol=0)
        assert 0 < (b - c).abs().max() < 3e-2  # bf16 for real, not fp32
    mine, native_metrics = theirs.train_rollout(batch()), ours.train_rollout(batch())
    assert mine["loss"] == pytest.approx(native_metrics["loss"], abs=1e-6)
    assert mine["grad_norm"] == pytest.approx(native_metrics["grad_norm"], rel=2e-3)
    assert all(p.dtype == torch.float32 for p in theirs.model.parameters())  # fp32 masters


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "deepseek_v3"])
def test_one_step_matches_native(family):
    ours, theirs = trainers(family)
    mine, native_metrics = theirs.train_rollout(batch()), ours.train_rollout(batch())
    # One step per rollout: ratio 1, so token_mean pg_loss = -sum(advantage * mask) / tokens
    # = -(5 * 1 - 3 * 1 + 7 * 0.5 - 4 * 0.5) / 19 = -3.5 / 19.
    assert mine["pg_loss"] == pytest.approx(-3.5 / 19, abs=1e-7)
    assert mine["loss"] == pytest.approx(native_metrics["loss"], abs=1e-6)
    assert mine["grad_norm"] == pytest.approx(native_metrics["grad_norm"], rel=1e-5)
    assert mine["entropy_loss"] == pytest.approx(native_metrics["entropy_loss"], rel=1e-5)
    updated = dict(theirs.export_weights())
    for name, tensor in ours.export_weights():
        torch.testing.assert_close(updated[name], tensor, atol=1e-5, rtol=0)


def test_kl_loss_reference_matches_native():
    algo = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k3")
    ours, theirs = trainers("qwen3", algo=algo)
    for _ in range(2):  # the second step's KL is against the unchanged reference
        native_metrics, mine = ours.train_rollout(batch()), theirs.train_rollout(batch())
    assert native_metrics["kl_loss"] > 0
    assert mine["kl_loss"] == pytest.approx(native_metrics["kl_loss"], rel=1e-3)
    assert mine["loss"] == pytest.approx(native_metrics["loss"], abs=1e-6)


@pytest.mark.parametrize("family", ["qwen3", "deepseek_v3"])
def test_checkpoint_resumes_exactly_and_converts(tmp_path, family):
    _, first = trainers(family)
    first.train_rollout(batch())
    first.save(tmp_path / "ckpt")
    _, second = trainers(family)
    second.load(tmp_path / "ckpt")
    assert second.num_optimizer_steps == 1
    first.train_rollout(batch())
    second.train_rollout(batch())  # same weights, Adam moments and schedule: the same bits
    for (name, a), (_, b) in zip(first.export_weights(), second.export_weights()):
        assert torch.equal(a, b), name
    second.save(tmp_path / "ckpt2")
    report = convert(tmp_path / "ckpt2" / "torch_dist", tmp_path / "hf", to="hf", verify=True)
    assert report.bitwise.ok and report.logits["bitwise"]
    converted, exported = dict(iter_state_dict(tmp_path / "hf")), dict(second.export_weights())
    # deepseek_v3's MTP layer (HF layer 3) is not built, so the checkpoint has none.
    assert set(exported) - set(converted) == ({n for n in exported if n.startswith("model.layers.3.")}
                                              if family == "deepseek_v3" else set())
    for name, tensor in converted.items():
        assert torch.equal(exported[name], tensor), name


def test_checkpoint_of_the_earlier_layout_resumes_exactly(tmp_path):
    """Checkpoints written before the optimizer moved into the torch_dist checkpoint (AdamW and the
    reference model in trainer_state.pt) still resume bit for bit."""
    algo = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.1)
    _, first = trainers("qwen3", algo=algo)
    first.train_rollout(batch())
    first.save(tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / "trainer_state.pt", weights_only=True)
    reference = {k: v for k, v in first.reference.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save({"optimizer": first.optimizer.state_dict(), "scheduler": state["scheduler"], "num_optimizer_steps": 1,
                "bad_steps_in_row": 0, "reference": reference}, tmp_path / "ckpt" / "trainer_state.pt")
    _, second = trainers("qwen3", algo=algo)
    second.load(tmp_path / "ckpt")
    assert first.train_rollout(batch()) == second.train_rollout(batch())
    for (name, a), (_, b) in zip(first.export_weights(), second.export_weights()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("change, message", [
    (dict(tensor_model_parallel_size=2), "^--tensor-model-parallel-size 2 needs 2 trainer ranks, one per shard "
                                         "\\(or a multiple of 2: data-parallel replicas\\): add --nproc-per-node 2$"),
    (dict(expert_model_parallel_size=4), "^--expert-model-parallel-size 4 needs 4 trainer ranks, one per shard "
                                         "\\(or a multiple of 4: data-parallel replicas\\): add --nproc-per-node 4$"),
    (dict(tensor_model_parallel_size=2, expert_model_parallel_size=2),
     "^--tensor-model-parallel-size 2 x --expert-model-parallel-size 2 needs 4 trainer ranks, one per shard"),
    (dict(pipeline_model_parallel_size=2), "^--pipeline-model-parallel-size 2 needs 2 trainer ranks, one per shard"),
    (dict(context_parallel_size=2), "^--context-parallel-size 2 needs 2 trainer ranks, one per shard"),
    (dict(context_parallel_size=2, pipeline_model_parallel_size=2),
     "^--context-parallel-size 2 x --pipeline-model-parallel-size 2 needs 4 trainer ranks, one per shard"),
    (dict(sequence_parallel=True), "^--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (dict(qat="int4"), "train.qat = 'int4' is not supported"),
    (dict(precision="fp8"), "^train.precision = 'fp8' is not supported with train.backend = 'megatron' yet; "
                            "expected 'bf16'"),
])
def test_refuses_what_it_cannot_run(change, message):
    cfg = TrainConfig(backend="megatron", **change)
    with pytest.raises(MilesError, match=message):
        build_trainer(cfg, AlgoConfig(), native("qwen3"), temperature=1.0, total_steps=1)


TP, EP = megatron_env.ParallelSizes, lambda size: megatron_env.ParallelSizes(expert=size)


@pytest.mark.parametrize("family, sizes, message", [
    ("qwen3_moe", TP(2), "^--tensor-model-parallel-size 2 for model_type 'qwen3_moe' needs --sequence-parallel "
                         "\\(megatron-core trains MoE layers tensor-parallel only with it\\); add it$"),
    ("deepseek_v3", TP(2), "^--tensor-model-parallel-size 2 for model_type 'deepseek_v3' needs --sequence-parallel "),
    ("deepseek_v3", TP(3, sequence_parallel=True), "^--tensor-model-parallel-size 3 does not divide the model's "
                                                   "num_attention_heads 4; use a size that divides it$"),
    ("qwen3", TP(3), "^--tensor-model-parallel-size 3 does not divide the model's num_attention_heads 4; use a size "
                     "that divides it$"),
    ("qwen3", TP(4), "--tensor-model-parallel-size 4 does not divide the model's num_key_value_heads 2"),
    ("qwen3", EP(2), "^--expert-model-parallel-size 2 is not supported for model_type 'qwen3' yet; expected one of: "
                     "qwen3_moe, deepseek_v3 \\(or size 1\\)$"),
    ("qwen3_moe", EP(3), "--expert-model-parallel-size 3 does not divide the model's num_experts 8"),
])
def test_refuses_model_parallel_splits_it_cannot_make(family, sizes, message):
    from miles_core.train.megatron_model import check_model_parallel, hf_config_of

    with pytest.raises(MilesError, match=message):
        check_model_parallel(hf_config_of(native(family)), sizes)


@pytest.mark.parametrize("sizes, world, message", [
    (TP(2), 3, "^--nproc-per-node 3 is not a multiple of --tensor-model-parallel-size 2 \\(data parallelism is "
               "ranks / 2 replicas of the model\\); use --nproc-per-node 2 or a multiple of it$"),
    (EP(4), 6, "--nproc-per-node 6 is not a multiple of --expert-model-parallel-size 4"),
    (megatron_env.ParallelSizes(tensor=2, context=2), 6,
     "^--nproc-per-node 6 is not a multiple of --tensor-model-parallel-size 2 x --context-parallel-size 2 "),
])
def test_refuses_ranks_that_are_not_whole_replicas(sizes, world, message):
    with pytest.raises(MilesError, match=message):
        megatron_env.check_sizes(sizes, world)


@pytest.mark.parametrize("sizes, world", [(TP(2), 4), (EP(2), 4), (TP(), 2), (TP(), 3), (TP(2), 2),
                                         (megatron_env.ParallelSizes(tensor=2, context=2), 8)])
def test_accepts_data_parallel_replicas_beside_model_parallel(sizes, world):
    megatron_env.check_sizes(sizes, world)  # DP = world / (TP x CP x EP): 2, 2, 2, 3, 1, 2


def engine_routing(kind: str, family: str = "qwen3_moe") -> list[np.ndarray]:
    """Per sample (len - 1, MoE layers, top-k) expert ids (both tiny MoE models: 2 MoE layers,
    top-2 of 8): the native router's own choice ("own", as an engine on the same weights records
    it) or a random one ("random")."""
    tokens = batch().tokens
    if kind == "own":
        recorder = build_trainer(TrainConfig(routing_replay="record"), AlgoConfig(), native(family),
                                 temperature=1.0, total_steps=1)
        routed = batch()
        recorder.compute_log_probs(routed)
        return routed.trainer_routed_experts
    rng = np.random.default_rng(0)
    return [np.stack([[rng.choice(8, 2, replace=False) for _ in range(2)] for _ in range(len(t) - 1)]).astype(np.int32)
            for t in tokens]


def replayed_batch(routed: list[np.ndarray]) -> TrainBatch:
    replayed = batch()
    replayed.routed_experts = routed
    return replayed


@pytest.mark.parametrize("family, kind, agreement", [("qwen3_moe", "own", 1.0), ("qwen3_moe", "random", 30 / 176),
                                                    ("deepseek_v3", "own", 1.0), ("deepseek_v3", "random", 24 / 176)])
def test_routing_replay_log_probs_match_native(family, kind, agreement):
    ours, theirs = trainers(family, TrainConfig(lr=1e-4, routing_replay="rollout"))
    routed = engine_routing(kind, family)
    native_logps = ours.compute_log_probs(replayed_batch(routed))
    megatron_logps = theirs.compute_log_probs(replayed_batch(routed))
    for a, b in zip(native_logps, megatron_logps):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    # 176 = 44 routed tokens x 2 MoE layers x 2 slots; a random choice hits the router's own
    # top-2 in 30 (qwen3_moe) / 24 (deepseek_v3) of them.
    assert theirs.last_pass_metrics() == {"routing_agreement": pytest.approx(agreement, abs=1e-12)}
    assert ours.last_pass_metrics() == theirs.last_pass_metrics()
    _, unreplayed = trainers(family)
    own_logps = unreplayed.compute_log_probs(batch())
    gap = max((a - b).abs().max().item() for a, b in zip(own_logps, megatron_logps))
    assert gap < 1e-6 if kind == "own" else gap > 1e-2  # replaying another choice changes the log-probs


@pytest.mark.parametrize("mode, steps", [("rollout", 1), ("record", 2)])
def test_routing_replay_training_matches_native(mode, steps):
    cfg = TrainConfig(lr=1e-4, routing_replay=mode, num_steps_per_rollout=steps)
    ours, theirs = trainers("qwen3_moe", cfg)
    routed = engine_routing("random")
    native_metrics = ours.train_rollout(replayed_batch(routed))
    mine = theirs.train_rollout(replayed_batch(routed))
    assert native_metrics["routing_agreement"] < 0.5 if mode == "rollout" else native_metrics["routing_agreement"] < 1
    for key in ("loss", "pg_loss", "entropy_loss", "routing_agreement"):
        assert mine[key] == pytest.approx(native_metrics[key], abs=1e-5), key
    assert mine["grad_norm"] == pytest.approx(native_metrics["grad_norm"], rel=1e-4)
    updated = dict(theirs.export_weights())
    for name, tensor in ours.export_weights():
        torch.testing.assert_close(updated[name], tensor, atol=1e-5, rtol=0)


def test_refuses_deepseek_v3_without_q_lora():
    with pytest.raises(MilesError, match="does not support deepseek_v3 without q LoRA"):
        build_trainer(TrainConfig(backend="megatron"), AlgoConfig(),
                      build_model({**TINY_DEEPSEEK_V3_CONFIG, "q_lora_rank": None}), temperature=1.0, total_steps=1)


def test_parallel_sizes_need_the_megatron_backend():
    with pytest.raises(ValueError, match="need backend 'megatron', got 'native'"):
        TrainConfig(tensor_model_parallel_size=2)


VARYING_REWARD = """
def reward(sample):
    return sum(map(ord, sample.response)) % 7 / 7
"""


def first_step(tmp_path, name: str, *args: str) -> dict:
    """The first step's metrics of `miles train --recipe tiny` with a reward that varies within
    groups (the tiny model's answers earn nothing from the recipe's reward: no gradient)."""
    result = CliRunner().invoke(app, ["train", "--recipe", "tiny", "--num-rollout", "1",
                                      "--set", "reward.type=miles_test_varying_reward:reward",
                                      "--output-dir", str(tmp_path / name), *args])
    assert result.exit_code == 0, result.output
    return next(r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "rollout/num_samples" in r)


@pytest.mark.parametrize("extra", [[], ["--set", "model.source=tiny-qwen3-moe"], ["--set", "model.source=tiny-deepseek-v3"]],
                         ids=["tiny", "tiny-moe", "tiny-deepseek-v3"])
def test_miles_train_runs_with_megatron_and_matches_native(tmp_path, monkeypatch, extra):
    (tmp_path / "miles_test_varying_reward.py").write_text(VARYING_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    native_step = first_step(tmp_path, "native", *extra)
    mine = first_step(tmp_path, "megatron", *extra, "--set", "train.backend=megatron")
    assert mine["rollout/raw_reward"] == native_step["rollout/raw_reward"]  # same engine, same samples
    assert native_step["train/grad_norm"] > 0.01  # a real update (GRPO advantages sum to 0: pg_loss is 0)
    for key in ("train/pg_loss", "train/entropy_loss", "train/train_rollout_logprob_abs_diff"):
        assert mine[key] == pytest.approx(native_step[key], abs=1e-5), key
    assert mine["train/grad_norm"] == pytest.approx(native_step["train/grad_norm"], rel=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size 2 needs 2 trainer ranks, one per shard"),
    (["--nproc-per-node", "3", "--tensor-model-parallel-size", "2"],
     "--nproc-per-node 3 is not a multiple of --tensor-model-parallel-size 2"),
])
def test_miles_train_refuses_layouts_it_cannot_run(tmp_path, args, message):
    result = CliRunner().invoke(app, ["train", "--recipe", "tiny", "--num-rollout", "1", "--output-dir",
                                      str(tmp_path / "run"), *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())  # rich wraps long lines
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_align_check_with_the_megatron_trainer():
    """The engine's log-probs against megatron-core's on the same weights (fp32, fast mode)."""
    import json

    result = CliRunner().invoke(app, ["align-check", "--recipe", "tiny", "--trainer", "megatron", "--num-prompts", "4",
                                      "--batch-sizes", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["trainer"] == "megatron"
    assert 0 < report["results"][0]["stats"]["max_abs_diff"] < 1e-5  # rounding only, not the same kernels


def test_true_on_policy_needs_the_native_trainer():
    from miles_core.config import load_config

    with pytest.raises((ValueError, MilesError), match="true_on_policy needs train.backend = 'native'"):
        load_config("tiny", ["train.backend=megatron", "alignment.mode=invariant", "alignment.true_on_policy=true"])
