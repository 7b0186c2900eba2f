"""`engine.ranks = "all"`: rank 0 splits a generation over every rank's engine and gathers the
answers in order; each rank answers its share under rank 0's weight version. Two gloo ranks on
CPU, the tiny model; the end-to-end runs (the FSDP weights into every engine, colocated or not)
are in `tests/e2e/test_e2e_nproc.py`."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from miles_core.checkpoint.loading import load_model
from miles_core.config import EngineConfig, ModelConfig, SamplingConfig, SyncConfig, load_config
from miles_core.engine import build_engine
from miles_core.engine.protocol import GenerateRequest
from miles_core.errors import MilesError
from miles_core.launch.local import run_ranks
from miles_core.rl import rank_engines
from miles_core.rl.rank_engines import EngineFollower, RankEngines, engine_of_ranks, shares
from miles_core.train.leader import LeaderTrainer, follow

SAMPLING = SamplingConfig(max_new_tokens=6, n_samples_per_prompt=2, temperature=1.0)
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12], [13, 14, 15]]


def test_shares_are_contiguous_and_differ_by_at_most_one():
    assert shares(list(range(7)), 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert shares([0], 2) == [[], [0]]
    assert shares([], 2) == [[], []]


def _engine():
    # Invariant kernels: a request's tokens do not depend on the batch it is generated in.
    return build_engine(EngineConfig(), load_model(ModelConfig(source="tiny-qwen3", device="cpu"),
                                                   alignment_mode="invariant"))


def _requests() -> list[GenerateRequest]:
    return [GenerateRequest(ids, SAMPLING, seed=10 + i, rid=f"r{i}") for i, ids in enumerate(PROMPTS)]


def _leader() -> dict:
    group = dist.new_group(backend="gloo")
    local = _engine()
    local.update_weights([], version="7")  # what rank 0's sync stamped; the follower is still at "0"
    asked, generate = [], local.generate
    local.generate = lambda requests, on_progress=None: asked.append(len(requests)) or generate(requests, on_progress)
    engines, progress = RankEngines(local, group), []
    answers = engines.generate(_requests(), on_progress=progress.append)
    LeaderTrainer(None, group).release()
    return {"answers": [[(g.output_ids, g.weight_version) for g in group_] for group_ in answers],
            "asked": asked, "progress": sum(progress)}


def _follower() -> None:
    group = dist.new_group(backend="gloo")
    follow(None, group, EngineFollower(_engine(), SyncConfig(), group))


def test_two_ranks_answer_a_generation_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    expected = _engine().generate(_requests())
    out = run_ranks(2, _leader, _follower, ())
    assert out["asked"] == [3]  # rank 0's engine generated its half; rank 1 the other
    assert out["answers"] == [[(g.output_ids, "7") for g in group] for group in expected]
    assert out["progress"] == len(PROMPTS) * SAMPLING.n_samples_per_prompt
    assert all(len(g.output_ids) > 0 for group in expected for g in group)


def test_the_run_generates_through_every_rank_only_when_asked(monkeypatch):
    monkeypatch.setattr(rank_engines.dist, "get_world_size", lambda group: 2)
    monkeypatch.setattr(LeaderTrainer, "current", None)  # restored after: this leader leads nothing
    engine, leader, cfg = object(), LeaderTrainer(None, group="control"), load_config("tiny", ["train.backend=fsdp"])
    every = load_config("tiny", ["train.backend=fsdp", "engine.ranks=all"])
    assert engine_of_ranks(cfg, engine, leader) is engine  # engine.ranks = "first"
    assert engine_of_ranks(every, engine, None) is engine  # no trainer (rollout only) or a single rank
    wrapped = engine_of_ranks(every, engine, leader)
    assert isinstance(wrapped, RankEngines) and wrapped.local is engine and wrapped.group == "control"


@pytest.mark.parametrize("override, message", [
    ("train.backend=native", "engine.ranks = 'all' needs train.backend = 'fsdp', got 'native'"),
    ("sync.transport=disk", "engine.ranks = 'all' needs sync.transport = 'auto' or 'inprocess', got 'disk'"),
    ("rollout.partial=true", "engine.ranks = 'all' needs rollout.partial = False, got True"),
])
def test_an_engine_on_every_rank_refuses_what_it_cannot_serve(override, message):
    overrides = ["engine.ranks=all", "train.backend=fsdp", "algo.over_sampling_batch_size=8", "algo.use_tis=true",
                 override]
    with pytest.raises(MilesError) as err:
        load_config("tiny", overrides)
    assert str(err.value) == f"config: {message}"
