"""`train.backend = "megatron"` with pipeline stages on gloo ranks on CPU (rank 0 leading, the
others following its calls, as `miles train --nproc-per-node N` runs them): two stages of one
layer each (qwen3, untied and tied embeddings; then beside two data-parallel replicas or two
tensor-parallel ranks) give what one rank gives: the same HF export (bitwise), log-probs (1e-5),
loss, gradient norm and updated weights; the two-stage torch_dist checkpoint resumes bitwise,
converts to HF with `miles convert` and loads into a one-rank trainer. MoE (qwen3_moe and
deepseek_v3, four layers, a dense one in the first stage) too: each stage routes, replays (R3,
`routing_replay = "record"`) and records its own MoE layers, and the routing agreement and every
number are one rank's; also on 4 ranks, two stages of two expert-parallel ranks (PP x EP), of
two tensor-parallel ranks with sequence parallelism, or of two data-parallel replicas; in bf16
deepseek_v3's first-stage routers stay fp32. Two stages of two replicas with the distributed
optimizer (ZeRO-1 over each stage's replicas) give one rank's numbers and resume bitwise. Two
stages of two context-parallel ranks each (qwen3; qwen3_moe with R3) give one rank's numbers."""

from __future__ import annotations

import functools

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the optional [megatron] extra)")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

from miles_core.checkpoint.convert import convert  # noqa: E402
from miles_core.checkpoint.hf import iter_state_dict  # noqa: E402
from miles_core.config import AlgoConfig, TrainConfig  # noqa: E402
from miles_core.errors import MilesError  # noqa: E402
from miles_core.models.base import named_weights  # noqa: E402
from miles_core.train import build_trainer, megatron_env  # noqa: E402
from miles_core.train.leader import follow, release_followers  # noqa: E402
from tests.train.spmd import run_spmd  # noqa: E402
from tests.train.test_megatron_backend import batch, native, replayed_batch  # noqa: E402
from tests.train.test_megatron_parallel import (  # noqa: E402
    _lead, _max_diff, _steps, assert_steps_match, lead_then_resume)

# A KL loss against the reference model (a pipeline of its own) and an entropy bonus: the second
# step has a non-zero KL; one token per micro-batch budget below makes several micro-batches.
ALGO = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k3", entropy_coef=0.01)
TRAIN = TrainConfig(backend="megatron", lr=1e-4, logprob_chunk_size=16, max_tokens_per_micro_batch=24)
PP2 = {"pipeline_model_parallel_size": 2}
TIED = {"tie_word_embeddings": True}


@pytest.fixture(scope="module", autouse=True)
def megatron_process_state():
    yield
    megatron_env.shutdown()


def _trainer(changes: dict, parallel: dict | None = None, family: str = "qwen3", train: TrainConfig = TRAIN):
    return build_trainer(replace(train, **(parallel or {})), ALGO, native(family, **changes), temperature=1.0,
                         total_steps=4)


def _ranks(rank: int, changes: dict, parallel: dict, folder: str, family: str = "qwen3", train: TrainConfig = TRAIN,
           make_batch=batch) -> dict | None:
    return lead_then_resume(rank, functools.partial(_trainer, changes, parallel, family, train), folder,
                            record=_leader_params, make_batch=make_batch)


def _leader_params(trainer) -> dict:
    return {"params": [name for name, _ in trainer.trainer.model.named_parameters()]}  # the leader's own


def _check_against_one_rank(many: dict, one: dict, changes: dict) -> None:
    weights = dict(named_weights(native("qwen3", **changes)))
    assert many["export"].keys() == weights.keys()  # tied: the embedding once, no lm_head
    assert all(torch.equal(many["export"][n], t) for n, t in weights.items())  # gathered stages: bitwise
    assert_steps_match(many, one)  # resumed from the pipeline's checkpoint too
    assert _max_diff(many["trained_twice"], one["trained_twice"]) < 1e-5


@pytest.mark.parametrize("changes", [{}, TIED], ids=["qwen3", "qwen3-tied"])
def test_two_stages_match_one_rank(tmp_path, changes):
    many = run_spmd(_ranks, changes, PP2, str(tmp_path))
    # rank 0 is the first stage: the embedding and layer 0 (the path counts the stage's layers)
    assert many["params"][0] == "embedding.word_embeddings.weight" and len(many["params"]) == 9  # q/k norms too
    assert all(n.startswith("decoder.layers.0.") for n in many["params"][1:])
    one = _steps(_trainer(changes))
    _check_against_one_rank(many, one, changes)
    # the two-stage checkpoint converts to HF: the weights the stages exported after their first step
    report = convert(tmp_path / "ckpt" / "torch_dist", tmp_path / "hf", to="hf", verify=True)
    assert report.bitwise.ok and report.logits["bitwise"]
    converted = dict(iter_state_dict(tmp_path / "hf"))
    assert converted.keys() == many["trained"].keys()
    assert all(torch.equal(t, many["trained"][n]) for n, t in converted.items())
    # and one rank reads it (dist_checkpointing joins the stages): the same weights, then its second step
    one_rank = _trainer(changes)
    one_rank.load(tmp_path / "ckpt")
    assert all(torch.equal(t, many["trained"][n]) for n, t in one_rank.export_weights())
    assert one_rank.train_rollout(batch())["loss"] == pytest.approx(many["second"]["loss"], abs=1e-6)


def test_refuses_pipeline_stages_it_cannot_run():
    from miles_core.train.megatron_model import check_model_parallel, hf_config_of

    for family in ("qwen3", "qwen3_moe"):
        with pytest.raises(MilesError, match="^--pipeline-model-parallel-size 3 does not divide the model's "
                                             "num_hidden_layers 2; use a size that divides it$"):
            check_model_parallel(hf_config_of(native(family)), megatron_env.ParallelSizes(pipeline=3))
    with pytest.raises(MilesError, match="^--tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2 needs "
                                         "4 trainer ranks, one per shard \\(or a multiple of 4: data-parallel "
                                         "replicas\\): add --nproc-per-node 4$"):
        megatron_env.check_sizes(megatron_env.ParallelSizes(tensor=2, pipeline=2), 1)
    with pytest.raises(MilesError, match="^--nproc-per-node 2 is not a multiple of --expert-model-parallel-size 2 x "
                                         "--pipeline-model-parallel-size 2 \\(data parallelism"):
        megatron_env.check_sizes(megatron_env.ParallelSizes(expert=2, pipeline=2), 2)
    megatron_env.check_sizes(megatron_env.ParallelSizes(expert=2, pipeline=2), 4)  # PP x EP: 4 ranks


@pytest.mark.parametrize("parallel", [{**PP2, "tensor_model_parallel_size": 2}, PP2,
                                      {**PP2, "tensor_model_parallel_size": 2, "sequence_parallel": True}],
                         ids=["pp2-tp2", "pp2-dp2", "pp2-tp2-sp"])
def test_four_ranks_match_one_rank(tmp_path, parallel):
    """Two stages of two tensor-parallel ranks each (also with sequence parallelism: each sends
    its half of the padded sequence on), or of two data-parallel replicas each (tied embeddings:
    their gradient summed over the replicas and the two ends)."""
    many = run_spmd(_ranks, TIED, parallel, str(tmp_path), world_size=4)
    _check_against_one_rank(many, _steps(_trainer(TIED)), TIED)


def test_context_parallel_stages_match_one_rank_and_resume(tmp_path):
    """PP=2 x CP=2, tied embeddings: each stage's two CP ranks run their two chunks of every
    sequence through its layers and send those T / CP rows on to the next stage's rank of the same
    CP place; the last stage gathers the log-probs over its CP pair; each stage's gradients are
    summed over its CP ranks. One rank's log-probs, losses, gradient norms and updated weights;
    the four ranks' checkpoint resumes the second step bitwise. Observed: log-probs 4.8e-7,
    losses 2.4e-7, weights 1.5e-7."""
    many = run_spmd(_ranks, TIED, {**PP2, "context_parallel_size": 2}, str(tmp_path), world_size=4)
    _check_against_one_rank(many, _steps(_trainer(TIED)), TIED)


@pytest.mark.parametrize("kind", ["random", "record"])
def test_context_parallel_moe_stages_replay_routing_like_one_rank(kind):
    """The same layout for qwen3_moe (four layers, tied): R3 with random ids, each CP rank
    replaying its chunks' rows of its stage's MoE layers; `record`: the old log-prob pass's
    records (each CP rank's chunks of each stage's layers, gathered in sequence order) replayed in
    the rollout's two optimizer steps. One rank's log-probs, losses, gradient norms, routing
    agreement and updated weights (no save: the layout's checkpoint is tested above). Observed
    (random): log-probs 4.8e-7, gradient norms 9.5e-7, weights 1.4e-6."""
    parallel, changes = {**PP2, "context_parallel_size": 2}, {**MOE["qwen3_moe"], **TIED}
    if kind == "record":
        make_batch, train = batch, replace(TRAIN, routing_replay="record", num_steps_per_rollout=2)
    else:
        make_batch = functools.partial(replayed_batch, _moe_routing("qwen3_moe", "random"))
        train = replace(TRAIN, routing_replay="rollout")
    many = run_spmd(_lead, functools.partial(_trainer, changes, parallel, "qwen3_moe", train), make_batch, world_size=4)
    one = _steps(_trainer(changes, family="qwen3_moe", train=train), make_batch=make_batch)
    assert _max_diff(many["logps"], one["logps"]) < 1e-5
    for step in ("first", "second"):
        assert many[step].get("routing_agreement") == one[step].get("routing_agreement"), step
        for key in ("loss", "pg_loss", "entropy_loss", "kl_loss", "grad_norm"):
            assert many[step][key] == pytest.approx(one[step][key], abs=1e-5), (step, key)
    assert one["second"]["kl_loss"] > 0 and one["first"]["grad_norm"] > 0.1  # something to compare
    assert _max_diff(many["trained"], one["trained"]) < 1e-5
    assert _max_diff(many["trained_twice"], one["trained_twice"]) < 1e-5
    assert _max_diff(many["trained"], many["export"]) > 1e-5  # the step moved the weights


def _zero_slices(trainer) -> dict:
    zero = trainer.trainer.zero  # the leader's (stage 0's) distributed optimizer
    return {"masters": sum(g.master.numel() for g in zero.groups),
            "params": sum(p.numel() for p in trainer.trainer.model.parameters())}


def test_distributed_optimizer_over_stages_matches_one_rank(tmp_path):
    """PP=2 x DP=2 with the distributed optimizer (ZeRO-1 over each stage's two replicas), tied
    embeddings (both ends' gradients summed before the reduce-scatter, the last stage's copy left
    out of the norm): one rank's log-probs, losses, gradient norms and updated weights; the
    checkpoint resumes bitwise on the same layout and one rank reads it."""
    parallel = {**PP2, "use_distributed_optimizer": True}
    make = functools.partial(_trainer, TIED, parallel)
    many = run_spmd(lead_then_resume, make, str(tmp_path), _zero_slices, world_size=4)
    _check_against_one_rank(many, _steps(_trainer(TIED)), TIED)
    assert 0 < many["masters"] <= -(-many["params"] // 2)  # stage 0's moments: half of its parameters
    one_rank = _trainer(TIED)  # the ZeRO checkpoint is in the plain optimizer's layout
    one_rank.load(tmp_path / "ckpt")
    assert all(torch.equal(t, many["trained"][n]) for n, t in one_rank.export_weights())
    assert one_rank.train_rollout(batch())["loss"] == pytest.approx(many["second"]["loss"], abs=1e-6)


# Four layers, one of stage 0's dense (qwen3_moe the second, deepseek_v3 the first): stage 0 holds
# MoE layer 0, stage 1 MoE layers 1 and 2 (HF layers 2 and 3), numbered from different offsets.
MOE = {"qwen3_moe": {"num_hidden_layers": 4, "mlp_only_layers": [1]},
       "deepseek_v3": {"num_hidden_layers": 4, "first_k_dense_replace": 1}}  # HF layer 4 is the MTP layer


def _moe_routing(family: str, kind: str) -> list[np.ndarray]:
    """Per sample (len - 1, 3 MoE layers, top-2 of 8) ids: the native model's own choice (as an
    engine on the same weights records it) or random ones (the replay then changes every number)."""
    if kind == "own":
        recorder = build_trainer(TrainConfig(routing_replay="record"), ALGO, native(family, **MOE[family]),
                                 temperature=1.0, total_steps=1)
        routed = batch()
        recorder.compute_log_probs(routed)
        return routed.trainer_routed_experts
    rng = np.random.default_rng(0)
    return [np.stack([[rng.choice(8, 2, replace=False) for _ in range(3)] for _ in range(len(t) - 1)])
            .astype(np.int32) for t in batch().tokens]


def _check_moe(many: dict, one: dict, family: str, changes: dict | None = None) -> None:
    weights = dict(named_weights(native(family, **(changes or MOE[family]))))
    assert all(torch.equal(many["export"][n], weights[n]) for n in weights)  # gathered stages: bitwise
    assert_steps_match(many, one)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_moe_two_stages_match_one_rank(tmp_path, family):
    """Each stage routes its own MoE layers (routing records gathered on the last stage); the
    stages' layers load and export under their HF layer numbers, dense and MoE alike."""
    many = run_spmd(_ranks, MOE[family], PP2, str(tmp_path), family)
    routers = [n for n in many["params"] if n.endswith("mlp.router.weight")]  # stage 0's one MoE layer
    assert routers == [f"decoder.layers.{int(family == 'deepseek_v3')}.mlp.router.weight"]
    _check_moe(many, _steps(_trainer(MOE[family], family=family)), family)


@pytest.mark.parametrize("kind", ["own", "random", "record"])
def test_moe_routing_replay_two_stages_match_one_rank(tmp_path, kind):
    """R3 (`routing_replay = "rollout"`) over two stages: each replays its own layers' ids. The
    engine's own routing gives agreement 1.0; random ids give one rank's (lower) agreement and,
    replayed, its log-probs and steps. `record`: the old log-prob pass's records (gathered from
    both stages) replayed in the rollout's two optimizer steps."""
    if kind == "record":
        make_batch, train = batch, replace(TRAIN, routing_replay="record", num_steps_per_rollout=2)
    else:
        make_batch = functools.partial(replayed_batch, _moe_routing("qwen3_moe", kind))
        train = replace(TRAIN, routing_replay="rollout")
    many = run_spmd(_ranks, MOE["qwen3_moe"], PP2, str(tmp_path), "qwen3_moe", train, make_batch)
    one = _steps(_trainer(MOE["qwen3_moe"], family="qwen3_moe", train=train), make_batch=make_batch)
    _check_moe(many, one, "qwen3_moe")
    if kind != "record":
        agreement = many["pass"]["routing_agreement"]
        assert agreement == 1.0 if kind == "own" else agreement < 0.5
        assert many["first"]["routing_agreement"] == agreement  # the first step runs on the rollout's weights


@pytest.mark.parametrize("parallel", [{**PP2, "expert_model_parallel_size": 2},
                                      {**PP2, "tensor_model_parallel_size": 2, "sequence_parallel": True}, PP2],
                         ids=["pp2-ep2", "pp2-tp2-sp", "pp2-dp2"])
def test_moe_four_ranks_match_one_rank(tmp_path, parallel):
    """qwen3_moe on 4 ranks, two stages of two expert-parallel ranks (each stage's routed experts
    split over them; they run the same micro-batches), of two tensor-parallel ranks with sequence
    parallelism (each router replays its part of the sequence) or of two data-parallel replicas;
    R3 with random ids, replayed on each stage's own layers. Tied embeddings: their gradient
    summed over both ends (and the EP copies or replicas)."""
    make_batch = functools.partial(replayed_batch, _moe_routing("qwen3_moe", "random"))
    train, changes = replace(TRAIN, routing_replay="rollout"), {**MOE["qwen3_moe"], **TIED}
    many = run_spmd(_ranks, changes, parallel, str(tmp_path), "qwen3_moe", train, make_batch, world_size=4)
    experts = [n for n in many["params"] if ".local_experts." in n]  # rank 0: stage 0's MoE layer only
    assert len(experts) == 2 * 8 // parallel.get("expert_model_parallel_size", 1)  # fc1, fc2 of its experts
    assert all(n.startswith("decoder.layers.0.mlp.experts.") for n in experts)
    one = _steps(_trainer(changes, family="qwen3_moe", train=train), make_batch=make_batch)
    _check_moe(many, one, "qwen3_moe", changes)


def test_deepseek_v3_stages_of_tensor_parallel_ranks_match_one_rank(tmp_path):
    """deepseek_v3 (MLA, shared experts, an MTP layer) on 4 ranks: two stages of two tensor-parallel
    ranks with sequence parallelism (MLA's up projections split by heads, its down projections
    replicated; each router on its part of the sequence), routing its own layers. One rank's
    numbers and a bitwise resume."""
    parallel = {**PP2, "tensor_model_parallel_size": 2, "sequence_parallel": True}
    many = run_spmd(_ranks, MOE["deepseek_v3"], parallel, str(tmp_path), "deepseek_v3", world_size=4)
    _check_moe(many, _steps(_trainer(MOE["deepseek_v3"], family="deepseek_v3")), "deepseek_v3")


def _bf16_log_probs(rank: int, family: str):
    trainer = _trainer(MOE[family], PP2, family, replace(TRAIN, compute_dtype="bfloat16"))
    if rank != 0:
        follow(trainer, trainer.control_group)
        return None
    logps = trainer.compute_log_probs(batch())
    release_followers()
    return logps


def test_deepseek_v3_two_stages_in_bf16_keep_the_router_fp32():
    """bf16 compute: the first stage's routers stay fp32 as the last stage's (and one rank's) do;
    log-probs equal to one rank's (observed 0; a bf16 router on stage 0 moves them by 2.2e-2)."""
    logps = run_spmd(_bf16_log_probs, "deepseek_v3")
    one = _trainer(MOE["deepseek_v3"], family="deepseek_v3", train=replace(TRAIN, compute_dtype="bfloat16"))
    assert _max_diff(logps, one.compute_log_probs(batch())) < 1e-3
