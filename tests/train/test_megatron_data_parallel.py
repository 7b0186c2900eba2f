"""`train.backend = "megatron"` with data parallelism beside tensor, expert or context parallelism,
on gloo ranks on CPU (fp32): DP = 2 replicas of one rank, TP = 2 x DP = 2 and EP = 2 x DP = 2
(4 ranks), the last two also with the distributed optimizer (ZeRO-1), and CP = 2 x DP = 2 with
it, give one rank's log-probs, loss, gradient norm and updated weights on the same samples; each
replica trains its token-balanced share; the checkpoint resumes bitwise on the same layout and
loads into one rank; `miles train --nproc-per-node 2` (DP = 2, MoE with R3) logs the one-rank
run's first step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core", reason="megatron-core is not installed (the optional [megatron] extra)")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

from miles_core.checkpoint.convert import convert  # noqa: E402
from miles_core.checkpoint.hf import iter_state_dict  # noqa: E402
from miles_core.config import TrainConfig  # noqa: E402
from miles_core.train import megatron_data, megatron_env  # noqa: E402
from miles_core.train.leader import follow, release_followers  # noqa: E402
from miles_core.train.megatron_data import Replicas  # noqa: E402
from tests.train.spmd import run_spmd  # noqa: E402
from tests.train.test_megatron_backend import VARYING_REWARD, batch  # noqa: E402
from tests.train.test_megatron_parallel import (CP2, EP2, TP2, _cli_steps, _max_diff, _steps, _trainer,  # noqa: E402
                                               _weights, assert_steps_match)

# batch(): 12, 9, 15, 12 tokens. By tokens, longest first: 15 -> replica 0, 12 (sample 0) -> 1,
# 12 (sample 3) -> 1 (12 < 15), 9 -> 0 (15 < 24): replica 0 trains samples 1 and 2, replica 1
# samples 0 and 3 (24 tokens each), so the gathers must put the log-probs back in order.
SHARES = [[1, 2], [0, 3]]


@pytest.fixture(scope="module", autouse=True)
def megatron_process_state():
    yield
    megatron_env.shutdown()


def _ranks(rank: int, family: str, parallel: dict[str, int], folder: str) -> dict | None:
    """Every rank's replica and share; rank 0 leads the steps with a save after the first, a fresh
    trainer resumes the save for the second step, then a one-sample rollout (one replica idle)."""
    trainer = _trainer(family, parallel)
    own = getattr(trainer, "trainer", trainer)  # rank 0's leader wraps it
    layout: list = [None] * dist.get_world_size()
    dist.all_gather_object(layout, (own.dp, sorted(i for group in own._step_micro_batches(batch()) for i in group)))
    if rank != 0:
        follow(trainer, trainer.control_group)
        for _ in range(2):
            trainer = _trainer(family, parallel)
            follow(trainer, trainer.control_group)
        return None
    zero = own.zero.groups if own.zero is not None else []  # the distributed optimizer's slices
    out = {"layout": layout, "masters": sum(g.master.numel() for g in zero),
           "params": sum(p.numel() for p in own.model.parameters()), **_steps(trainer, Path(folder) / "ckpt")}
    release_followers()
    resumed = _trainer(family, parallel)
    resumed.load(Path(folder) / "ckpt")
    out["resumed_second"], out["resumed_trained_twice"] = resumed.train_rollout(batch()), _weights(resumed)
    release_followers()
    out["single"] = _single(_trainer(family, parallel))
    release_followers()
    return out


def _single(trainer) -> dict:
    """A rollout of sample 2 alone: the other replica has nothing to train (its gradients are zeros)."""
    return {**trainer.train_rollout(batch().select([2])), "trained": _weights(trainer)}


FOUR = [Replicas(2, index, leader, gather=True) for index in (0, 1) for leader in (True, False)]
ZERO = {"use_distributed_optimizer": True}
LAYOUTS = {  # (family, parallel, ranks): the replicas expected on each rank
    "qwen3-dp2": ("qwen3", {}, [Replicas(2, 0, True, gather=True), Replicas(2, 1, True, gather=True)]),
    "qwen3-tp2-dp2": ("qwen3", TP2, FOUR),
    "qwen3_moe-ep2-dp2": ("qwen3_moe", EP2, FOUR),
    "qwen3-tp2-dp2-zero": ("qwen3", {**TP2, **ZERO}, FOUR),
    "qwen3_moe-ep2-dp2-zero": ("qwen3_moe", {**EP2, **ZERO}, FOUR),
    # a replica's two CP ranks share its samples (rank 1 does not report); ZeRO over the 4 DP x CP ranks
    "qwen3-cp2-dp2-zero": ("qwen3", {**CP2, **ZERO}, FOUR),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_data_parallel_matches_one_rank(tmp_path, layout):
    family, parallel, replicas = LAYOUTS[layout]
    many = run_spmd(_ranks, family, parallel, str(tmp_path), world_size=len(replicas))
    one = _steps(_trainer(family))
    assert many["layout"] == [(r, SHARES[r.index]) for r in replicas]  # a replica's ranks: consecutive, one share
    assert_steps_match(many, one)  # log-probs gathered back in the batch's order; resumed on the same layout
    # -3.5 / 19 (test_megatron_backend's hand check): the replicas' sums use the whole step's counts
    assert many["first"]["pg_loss"] == pytest.approx(-3.5 / 19, abs=1e-7)
    assert many["export"].keys() == one["export"].keys()
    assert _max_diff(many["trained_twice"], one["trained_twice"]) < 1e-5
    if "use_distributed_optimizer" in parallel:  # ZeRO-1: the plain update (within 1e-6), half the moments or less
        assert _max_diff(many["trained_twice"], one["trained_twice"]) < 1e-6
        assert 0 < many["masters"] <= -(-many["params"] // 2)
    # the replicas wrote one copy: it converts to exactly the weights exported after the first step
    report = convert(tmp_path / "ckpt" / "torch_dist", tmp_path / "hf", to="hf", verify=True)
    assert report.bitwise.ok
    assert all(torch.equal(t, many["trained"][n]) for n, t in iter_state_dict(tmp_path / "hf"))
    one_rank = _trainer(family)  # and one rank reads it
    one_rank.load(tmp_path / "ckpt")
    assert all(torch.equal(t, many["trained"][n]) for n, t in one_rank.export_weights())
    single = _single(_trainer(family))
    assert many["single"]["loss"] == pytest.approx(single["loss"], abs=1e-6)
    assert many["single"]["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    assert _max_diff(many["single"]["trained"], single["trained"]) < 1e-5


def test_gradient_buckets_keep_order_and_dtype(monkeypatch):
    """Buckets of consecutive same-dtype tensors up to BUCKET_BYTES (a larger tensor alone)."""
    monkeypatch.setattr(megatron_data, "BUCKET_BYTES", 64)  # 16 fp32 elements
    a, b, c = torch.zeros(8), torch.zeros(8), torch.zeros(4)  # 32 + 32 bytes fill one, c starts the next
    big, half = torch.zeros(20), torch.zeros(2, dtype=torch.bfloat16)  # 80 bytes: alone; another dtype: new
    buckets = megatron_data._buckets([a, b, c, big, half])
    assert [[id(t) for t in bucket] for bucket in buckets] == [[id(a), id(b)], [id(c)], [id(big)], [id(half)]]


def test_miles_train_data_parallel_matches_one_rank(tmp_path, monkeypatch):
    """`--nproc-per-node 2` with no TP or EP: two replicas, the MoE router replaying the engine's
    experts (R3): the first step's loss, mismatch, gradient norm and routing agreement of one rank."""
    (tmp_path / "miles_test_varying_reward.py").write_text(VARYING_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["--set", "model.source=tiny-qwen3-moe", "--set", "train.routing_replay=rollout", "--set",
            "engine.return_routed_experts=true"]
    one = _cli_steps(tmp_path, "one", *args)
    megatron_env.shutdown()  # that run's one-rank group: the launcher starts a 2-rank group in this process
    two = _cli_steps(tmp_path, "two", "--nproc-per-node", "2", *args)
    assert len(two) == 2 and two[0]["rollout/raw_reward"] == one[0]["rollout/raw_reward"]
    assert one[0]["train/grad_norm"] > 0.01 and abs(one[0]["train/loss"]) > 0.01  # a real update
    for key in ("train/loss", "train/pg_loss", "train/entropy_loss", "train/train_rollout_logprob_abs_diff"):
        assert two[0][key] == pytest.approx(one[0][key], abs=1e-5), key
    assert two[0]["train/grad_norm"] == pytest.approx(one[0]["train/grad_norm"], rel=1e-5)
    assert two[0]["train/routing_agreement"] == one[0]["train/routing_agreement"] == 1.0
    assert two[1]["train/loss"] == pytest.approx(one[1]["train/loss"], abs=1e-5)  # after a synced update


def test_distributed_optimizer_needs_the_megatron_backend():
    with pytest.raises(ValueError, match="^use_distributed_optimizer needs backend 'megatron', got 'fsdp'$"):
        TrainConfig(backend="fsdp", use_distributed_optimizer=True)


def test_distributed_optimizer_on_one_rank_is_the_plain_update(tmp_path):
    """One rank: a single slice holds every parameter; two steps, a save and a load give the plain
    optimizer's weights (AdamW is elementwise), and each optimizer reads the other's checkpoint."""
    plain, zero = _trainer("qwen3"), _trainer("qwen3", ZERO)
    for trainer in (plain, zero):
        trainer.train_rollout(batch())
    zero.save(tmp_path / "zero")
    plain.save(tmp_path / "plain")
    crossed = {"zero": _trainer("qwen3"), "plain": _trainer("qwen3", ZERO)}  # each loads the other's
    for name, trainer in crossed.items():
        trainer.load(tmp_path / name)
    trainers = [plain, zero, *crossed.values()]
    before = _weights(plain)
    for trainer in trainers:
        trainer.train_rollout(batch())
    after = [_weights(t) for t in trainers]
    assert _max_diff(after[0], before) > 1e-5  # the second step moved the weights
    for weights in after[1:]:
        assert _max_diff(weights, after[0]) < 1e-6


def test_slime_distributed_optimizer_flag_selects_the_megatron_backend():
    from miles_core.launch.slime_flags import FLAGS

    assert FLAGS["--use-distributed-optimizer"].apply(True) == {"train.use_distributed_optimizer": True,
                                                                "train.backend": "megatron"}
