"""`train.backend = "megatron"` on two gloo ranks on CPU (rank 0 leading, rank 1 following its
calls, as `miles train --nproc-per-node 2` runs them): tensor parallelism 2 (dense families; MoE
ones with sequence parallelism, deepseek_v3's MLA split by heads; half of every split layer on
each rank), expert parallelism 2 (MoE families, half of the routed experts on each rank) and
context parallelism 2 (dense families and deepseek_v3's MLA, two of the four chunks of every
sequence on each rank) give what one rank gives: the same HF export (bitwise), log-probs (1e-5 of
the native trainer's), loss, gradient norm and updated weights; the two-rank torch_dist
checkpoint resumes bitwise, converts to HF with `miles convert`, and loads into a one-rank
trainer; on four ranks TP x EP (qwen3_moe, deepseek_v3), CP x TP (qwen3; qwen3_moe with sequence
parallelism and routing recorded then replayed) and CP x EP (qwen3_moe, routing recorded then
replayed) do too; `miles train --nproc-per-node 2` runs
with TP or EP (and with two pipeline stages, dense and MoE,
`test_megatron_pipeline.py`) and logs the one-rank
run's first step; bf16 compute too."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

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
from miles_core.metrics import read_metrics  # noqa: E402
from miles_core.models.base import named_weights  # noqa: E402
from miles_core.train import build_trainer, megatron_env  # noqa: E402
from miles_core.train.leader import follow, release_followers  # noqa: E402
from miles_core.train.megatron_context import ContextSplit, ResponseRows, split_inputs  # noqa: E402
from tests.train.spmd import run_spmd  # noqa: E402
from tests.train.test_megatron_backend import VARYING_REWARD, batch, native  # noqa: E402

# A KL loss against the reference model (kept and checkpointed as shards too) and an entropy bonus
# (the vocab-parallel entropy's gradient): the second step has a non-zero KL.
ALGO = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k3", entropy_coef=0.01)
TRAIN = TrainConfig(backend="megatron", lr=1e-4, logprob_chunk_size=16)  # 44 response tokens: 3 chunks


@pytest.fixture(scope="module", autouse=True)
def megatron_process_state():
    yield
    megatron_env.shutdown()


def _trainer(family: str, parallel: dict[str, int] | None = None):
    return build_trainer(replace(TRAIN, **(parallel or {})), ALGO, native(family), temperature=1.0, total_steps=4)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in trainer.export_weights()}


def _steps(trainer, folder: Path | None = None, make_batch=batch) -> dict:
    """Log-probs (and their pass's routing agreement), a step, (a save), a second step: what both
    layouts are compared on."""
    out = {"export": _weights(trainer), "logps": trainer.compute_log_probs(make_batch()),
           "pass": trainer.last_pass_metrics()}
    out["first"], out["trained"] = trainer.train_rollout(make_batch()), _weights(trainer)
    if folder is not None:
        trainer.save(folder)
    out["second"], out["trained_twice"] = trainer.train_rollout(make_batch()), _weights(trainer)
    return out


def _two_ranks(rank: int, family: str, parallel: dict[str, int], folder: str) -> dict | None:
    return lead_then_resume(rank, functools.partial(_trainer, family, parallel), folder)


def lead_then_resume(rank: int, make_trainer, folder: str, record=None, make_batch=batch) -> dict | None:
    """Rank 0 leads: the steps with a save after the first (plus `record(trainer)`), then a fresh
    trainer loads the save and runs the second step again. The other ranks follow both trainers."""
    if rank != 0:
        for _ in range(2):
            trainer = make_trainer()
            follow(trainer, trainer.control_group)
        return None
    trainer = make_trainer()
    out = _steps(trainer, Path(folder) / "ckpt", make_batch)
    out.update(record(trainer) if record else {})
    release_followers()
    resumed = make_trainer()
    resumed.load(Path(folder) / "ckpt")
    out["resumed_second"], out["resumed_trained_twice"] = resumed.train_rollout(make_batch()), _weights(resumed)
    release_followers()
    return out


def _max_diff(a: dict | list, b: dict | list) -> float:
    pairs = zip(a.values(), b.values()) if isinstance(a, dict) else zip(a, b)
    return max((x - y).abs().max().item() for x, y in pairs)


def assert_steps_match(many: dict, one: dict) -> None:
    """`_steps` of a many-rank layout against one rank's: log-probs, routing agreement (exact:
    counts of equal expert ids), both steps' losses and gradient norms, the first update, and the
    resumed second step (weights, AdamW moments, reference, schedule) bitwise against the
    uninterrupted one."""
    assert _max_diff(many["logps"], one["logps"]) < 1e-5
    assert many["pass"] == one["pass"]  # MoE with the engine's routing: the same routing agreement
    for step in ("first", "second"):
        assert many[step].get("routing_agreement") == one[step].get("routing_agreement"), step
        for key in ("loss", "pg_loss", "entropy_loss", "kl_loss"):
            assert many[step][key] == pytest.approx(one[step][key], abs=1e-5), (step, key)
        assert many[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-5), step
    assert one["second"]["kl_loss"] > 0 and one["first"]["grad_norm"] > 0.1  # the checks have something to compare
    assert _max_diff(many["trained"], one["trained"]) < 1e-5
    assert _max_diff(many["trained"], many["export"]) > 1e-5  # the step moved the weights
    assert many["resumed_second"] == many["second"]
    assert all(torch.equal(many["resumed_trained_twice"][n], t) for n, t in many["trained_twice"].items())


TP2, EP2 = {"tensor_model_parallel_size": 2}, {"expert_model_parallel_size": 2}
TP2_SP = {**TP2, "sequence_parallel": True}  # norms on half of the (odd-length, padded) sequence each
CP2 = {"context_parallel_size": 2}  # chunks 0 and 3 of every (padded) sequence on CP rank 0, 1 and 2 on rank 1


# llama: tied embeddings (vocab-split, one tensor); deepseek_v3: MLA, shared experts, an MTP layer
@pytest.mark.parametrize("family, parallel", [("qwen3", TP2), ("llama", TP2), ("qwen3_moe", EP2),
                                              ("deepseek_v3", EP2), ("qwen3", TP2_SP), ("llama", TP2_SP),
                                              ("qwen3_moe", TP2_SP), ("deepseek_v3", TP2_SP), ("qwen3", CP2),
                                              ("llama", CP2), ("deepseek_v3", CP2)],
                         ids=["qwen3-tp2", "llama-tp2", "qwen3_moe-ep2", "deepseek_v3-ep2", "qwen3-tp2-sp",
                              "llama-tp2-sp", "qwen3_moe-tp2-sp", "deepseek_v3-tp2-sp", "qwen3-cp2", "llama-cp2",
                              "deepseek_v3-cp2"])
def test_two_ranks_match_one_rank(tmp_path, family, parallel):
    two = run_spmd(_two_ranks, family, parallel, str(tmp_path))
    one = _steps(_trainer(family))
    expected_logps = build_trainer(TrainConfig(), ALGO, native(family), temperature=1.0,
                                   total_steps=4).compute_log_probs(batch())
    weights = dict(named_weights(native(family)))
    assert two["export"].keys() == weights.keys()  # tied llama: the embedding once, no lm_head
    assert all(torch.equal(two["export"][n], t) for n, t in weights.items())  # gathered shards: bitwise
    assert _max_diff(two["logps"], expected_logps) < 1e-5  # observed <= 9.5e-7
    assert_steps_match(two, one)  # resumed from the TP=2 checkpoint too
    # the two-rank checkpoint converts to HF: the weights the two ranks exported after their first
    # step (deepseek_v3's MTP layer, HF layer 3, is not built, so the checkpoint has none)
    report = convert(tmp_path / "ckpt" / "torch_dist", tmp_path / "hf", to="hf", verify=True)
    assert report.bitwise.ok and report.logits["bitwise"]
    converted = dict(iter_state_dict(tmp_path / "hf"))
    assert converted.keys() == {n for n in two["trained"] if not n.startswith("model.layers.3.")}
    assert all(torch.equal(t, two["trained"][n]) for n, t in converted.items())
    # and one rank reads it (dist_checkpointing reshards): the same weights, then one rank's second step
    one_rank = _trainer(family)
    one_rank.load(tmp_path / "ckpt")
    assert all(torch.equal(t, two["trained"][n]) for n, t in one_rank.export_weights())
    assert one_rank.train_rollout(batch())["loss"] == pytest.approx(two["second"]["loss"], abs=1e-6)


def test_tensor_and_expert_parallel_together_match_one_rank(tmp_path):
    """qwen3_moe on 4 ranks, TP=2 x EP=2 with sequence parallelism: each EP rank's experts split
    over its TP pair; export bitwise, and one rank's steps."""
    many = run_spmd(_two_ranks, "qwen3_moe", {**TP2_SP, **EP2}, str(tmp_path), world_size=4)
    weights = dict(named_weights(native("qwen3_moe")))
    assert all(torch.equal(many["export"][n], t) for n, t in weights.items())
    assert_steps_match(many, _steps(_trainer("qwen3_moe")))


def _lead(rank: int, make_trainer, make_batch=batch) -> dict | None:
    """Rank 0 leads `_steps` (no save), the other ranks follow."""
    trainer = make_trainer()
    if rank != 0:
        follow(trainer, trainer.control_group)
        return None
    out = _steps(trainer, make_batch=make_batch)
    release_followers()
    return out


def test_deepseek_v3_tensor_and_expert_parallel_together_match_one_rank():
    """deepseek_v3 on 4 ranks, TP=2 x EP=2 with sequence parallelism: MLA's heads split over each
    TP pair (its down projections replicated), each EP rank's experts split over it too; export
    bitwise, and one rank's steps (no save: the TP=2 checkpoint above covers MLA's shards)."""
    many = run_spmd(_lead, functools.partial(_trainer, "deepseek_v3", {**TP2_SP, **EP2}), world_size=4)
    one = _steps(_trainer("deepseek_v3"))
    assert all(torch.equal(many["export"][n], t) for n, t in named_weights(native("deepseek_v3")))
    assert _max_diff(many["logps"], one["logps"]) < 1e-5  # observed 9.5e-7
    for step in ("first", "second"):
        assert many[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-5), step
        assert many[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-5), step
    assert _max_diff(many["trained_twice"], one["trained_twice"]) < 1e-5  # observed 3.5e-6


def test_context_split_holds_chunks_r_and_2cp_minus_1_minus_r():
    """T = 8, CP = 2: four chunks of two; rank 0 holds chunks 0 and 3, rank 1 (this one) 1 and 2."""
    split, ids_BT = ContextSplit(2, 1), torch.arange(10, 18)[None]
    assert split.positions(8).tolist() == [[0, 1, 6, 7], [2, 3, 4, 5]]
    local_BT, positions_BT, mask = split_inputs(ids_BT, split)
    assert local_BT.tolist() == [[12, 13, 14, 15]] and positions_BT.tolist() == [[2, 3, 4, 5]]
    # keys in gathered order 0 1 6 7 | 2 3 4 5: the query at position 2 sees 0, 1 and itself
    assert (~mask[0, 0, 0]).int().tolist() == [1, 1, 0, 0, 1, 0, 0, 0]
    # response predictors at columns 1, 5, 6: rank 1 holds 5 (its local column 3, target id 16);
    # gathered in rank order (1, 6 | 5), put back by order [0, 2, 1]
    where = ResponseRows.build(ids_BT, torch.zeros(3, dtype=torch.long), torch.tensor([1, 5, 6]), split)
    assert where.cols.tolist() == [3] and where.targets.tolist() == [16] and where.counts == [2, 1]
    assert where.order.tolist() == [0, 2, 1]


def _routing(trainer) -> dict:
    """The experts the policy's log-prob pass recorded (`routing_replay = "record"`), and a step
    that replays them."""
    recorded = batch()
    trainer.compute_log_probs(recorded)
    return {"routed": recorded.trainer_routed_experts, "replayed": trainer.train_rollout(recorded)}


@pytest.mark.parametrize("family, parallel", [
    ("qwen3", {**CP2, **TP2}),
    # routing recorded by the log-prob pass, replayed by the steps: the routers' parts gathered over TP and CP
    ("qwen3_moe", {**CP2, **TP2_SP, "routing_replay": "record"}),
    # each CP rank routes its own chunks; the experts' gradients summed over megatron's expert-data-
    # parallel group, which spans the CP ranks
    ("qwen3_moe", {**CP2, **EP2, "routing_replay": "record"}),
    # MLA's core attention over the CP pair's gathered K/V beside the EP split of routed experts
    ("deepseek_v3", {**CP2, **EP2}),
], ids=["qwen3-cp2-tp2", "qwen3_moe-cp2-tp2-sp-record", "qwen3_moe-cp2-ep2-record", "deepseek_v3-cp2-ep2"])
def test_context_parallel_beside_tensor_or_expert_parallel_matches_one_rank(tmp_path, family, parallel):
    """4 ranks, CP=2 x TP=2 (CP=2 x EP=2): each CP rank's two chunks of the sequence, its layers
    split over its TP pair (its experts over its EP pair); one rank's steps (and MoE routing
    records) on the same samples."""
    record = _routing if "routing_replay" in parallel else None
    make = functools.partial(_trainer, family, parallel)
    many = run_spmd(lead_then_resume, make, str(tmp_path), record, world_size=4)
    one_rank = _trainer(family, {k: v for k, v in parallel.items() if k == "routing_replay"})
    one = _steps(one_rank)
    assert_steps_match(many, one)
    if record:
        routing = _routing(one_rank)
        assert len(routing["routed"]) == 4
        assert all(np.array_equal(a, b) for a, b in zip(many["routed"], routing["routed"]))
        assert many["replayed"]["loss"] == pytest.approx(routing["replayed"]["loss"], abs=1e-5)
        assert many["replayed"]["grad_norm"] == pytest.approx(routing["replayed"]["grad_norm"], rel=1e-5)


def _cli_steps(tmp_path: Path, name: str, *args: str) -> list[dict]:
    """Per-step metrics of a 2-step `miles train --recipe tiny` whose reward varies within groups,
    with an entropy bonus (GRPO's pg_loss is 0 at ratio 1: the loss is then the entropy term)."""
    result = CliRunner().invoke(app, ["train", "--recipe", "tiny", "--num-rollout", "2", "--set",
                                      "reward.type=miles_test_varying_reward:reward", "--set", "train.backend=megatron",
                                      "--set", "algo.entropy_coef=0.01", "--output-dir", str(tmp_path / name), *args])
    assert result.exit_code == 0, result.output
    return [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "rollout/num_samples" in r]


@pytest.mark.parametrize("args", [
    ["--set", "train.tensor_model_parallel_size=2"],
    ["--set", "train.tensor_model_parallel_size=2", "--set", "train.sequence_parallel=true"],
    ["--set", "train.pipeline_model_parallel_size=2"],  # two stages, one layer each
    ["--set", "train.context_parallel_size=2"],  # two chunks of every sequence on each rank
    # R3 under expert parallelism: the router replays the engine's experts (agreement 1.0)
    ["--set", "model.source=tiny-qwen3-moe", "--set", "train.expert_model_parallel_size=2", "--set",
     "train.routing_replay=rollout", "--set", "engine.return_routed_experts=true"],
    # ... and under TP with sequence parallelism: each rank's router replays its part of the sequence
    ["--set", "model.source=tiny-qwen3-moe", "--set", "train.tensor_model_parallel_size=2", "--set",
     "train.sequence_parallel=true", "--set", "train.routing_replay=rollout", "--set", "engine.return_routed_experts=true"],
    # ... and under CP: each rank's router replays its two chunks of the sequence
    ["--set", "model.source=tiny-qwen3-moe", "--set", "train.context_parallel_size=2", "--set",
     "train.routing_replay=rollout", "--set", "engine.return_routed_experts=true"],
    # ... and over two pipeline stages: each replays its own MoE layer, the last measures both
    ["--set", "model.source=tiny-qwen3-moe", "--set", "train.pipeline_model_parallel_size=2", "--set",
     "train.routing_replay=rollout", "--set", "engine.return_routed_experts=true"],
], ids=["tp2", "tp2-sp", "pp2", "cp2", "qwen3_moe-ep2", "qwen3_moe-tp2-sp", "qwen3_moe-cp2", "qwen3_moe-pp2"])
def test_miles_train_on_two_ranks_matches_one_rank(tmp_path, monkeypatch, args):
    (tmp_path / "miles_test_varying_reward.py").write_text(VARYING_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = [a for a in args if a.startswith("model.") or a.startswith("train.routing") or a.startswith("engine.")]
    one = _cli_steps(tmp_path, "one", *[x for a in model for x in ("--set", a)])
    megatron_env.shutdown()  # that run's one-rank group: the launcher starts a 2-rank group in this process
    two = _cli_steps(tmp_path, "two", "--nproc-per-node", "2", *args)
    assert len(two) == 2 and (tmp_path / "two" / "checkpoints" / "step_000002" / "trainer" / "torch_dist").is_dir()
    assert two[0]["rollout/raw_reward"] == one[0]["rollout/raw_reward"]  # same engine, same samples
    assert one[0]["train/grad_norm"] > 0.01 and abs(one[0]["train/loss"]) > 0.01  # a real update
    for key in ("train/loss", "train/pg_loss", "train/entropy_loss", "train/train_rollout_logprob_abs_diff"):
        assert two[0][key] == pytest.approx(one[0][key], abs=1e-5), key
    assert two[0]["train/grad_norm"] == pytest.approx(one[0]["train/grad_norm"], rel=1e-5)
    if "train.routing_replay=rollout" in args:
        assert two[0]["train/routing_agreement"] == one[0]["train/routing_agreement"] == 1.0


def _bf16_log_probs(rank: int, family: str, parallel: dict[str, int]):
    trainer = build_trainer(replace(TRAIN, compute_dtype="bfloat16", **parallel), ALGO, native(family),
                            temperature=1.0, total_steps=4)
    if rank != 0:
        follow(trainer, trainer.control_group)
        return None
    logps = trainer.compute_log_probs(batch())
    grad_norm = trainer.train_rollout(batch())["grad_norm"]
    release_followers()
    return logps, grad_norm


@pytest.mark.parametrize("family, parallel", [("qwen3", TP2), ("qwen3_moe", EP2),
                                              ("qwen3", {"pipeline_model_parallel_size": 2})],
                         ids=["qwen3-tp2", "qwen3_moe-ep2", "qwen3-pp2"])
def test_bf16_compute_on_two_ranks_matches_one_rank_within_bf16_rounding(family, parallel):
    """bf16 compute (parameters cast per call, fp32 masters) with the layers split over two ranks:
    the one-rank bf16 run's log-probs within bf16 rounding and its gradient norm within 1%."""
    logps, grad_norm = run_spmd(_bf16_log_probs, family, parallel)
    one = build_trainer(replace(TRAIN, compute_dtype="bfloat16"), ALGO, native(family), temperature=1.0, total_steps=4)
    assert _max_diff(logps, one.compute_log_probs(batch())) < 3e-2
    assert grad_norm == pytest.approx(one.train_rollout(batch())["grad_norm"], rel=1e-2)
