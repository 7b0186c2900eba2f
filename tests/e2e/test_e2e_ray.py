"""`miles train --ray` on a local Ray (2 CPUs, gloo, the tiny model): the same train metrics as
one process (relative 1e-5), every actor gone and Ray shut down after the run; a failing rank
stops the run at once with its error named and tears the other ranks down; a stop request reaches
rank 0, which saves and ends with `RunStopped`. Skipped where Ray is not installed."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.errors import MilesError, RunStopped
from miles_core.metrics import read_metrics
from tests.kernel_noise import noise_differences, without_noise

ray = pytest.importorskip("ray", reason="the Ray launcher needs Ray: pip install 'miles[ray]'")
from miles_core.launch.ray_launch import run_ray_ranks  # noqa: E402

runner = CliRunner()
COMMON = ["train", "--recipe", "tiny", "--set", "algo.entropy_coef=0.01"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One home folder for the module: the first Ray start writes its auth token there and turns
    token mode on for this process, so later starts must find the same token."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def ray_home(tmp_path, home, monkeypatch):
    """Ray's session files in a throwaway folder (a short path: Ray's Unix sockets live there and
    their paths are limited to 107 bytes); Ray's own additions to the environment undone after."""
    before = dict(os.environ)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                      os.environ.get("PYTHONPATH", "")]))
    yield tmp_path
    shutil.rmtree(temp, ignore_errors=True)
    for key in set(os.environ) - set(before):
        if key.startswith("RAY_"):
            del os.environ[key]
    assert not ray.is_initialized()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_ray_ranks_give_the_one_process_metrics(ray_home):
    """Two Ray ranks, the engine in rank 0's actor or one in each (`engine.ranks = "all"`)."""
    one, two, every = ray_home / "one", ray_home / "two", ray_home / "every"
    result = runner.invoke(app, [*COMMON, "--output-dir", str(one)])
    assert result.exit_code == 0, result.output
    ranks = ["--ray", "--nproc-per-node", "2", "--set", "train.backend=fsdp"]
    for folder, extra in ((two, []), (every, ["--set", "engine.ranks=all"])):
        result = runner.invoke(app, [*COMMON, "--output-dir", str(folder), *ranks, *extra])
        assert result.exit_code == 0, result.output
    a_metrics = read_metrics(one / "metrics.jsonl")
    trained = [m for m in a_metrics if "train/loss" in m]
    assert len(trained) == 2 and all(m["train/grad_norm"] > 0 for m in trained)
    for b_metrics in (read_metrics(two / "metrics.jsonl"), read_metrics(every / "metrics.jsonl")):
        assert len(b_metrics) == len(a_metrics)
        for a, b in zip(a_metrics, b_metrics):
            for key in ("train/loss", "train/grad_norm", "train/pg_loss", "train/entropy_loss"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-5), key
            assert b.get("rollout/raw_reward") == a.get("rollout/raw_reward")
    trainer = two / "checkpoints" / "step_000002" / "trainer"
    assert (trainer / "dcp" / ".metadata").is_file() and (trainer / "trainer_state.pt").is_file()


# Rank functions for the launcher tests; pickled by value so the Ray workers need not import tests/.
def _record_pid(folder: str, rank: int) -> None:
    Path(folder, f"rank{rank}").write_text(str(os.getpid()))


def _lead_into_barrier(folder: str, *, on_step, should_stop) -> None:
    import torch.distributed as dist

    _record_pid(folder, 0)
    dist.barrier()  # never met: rank 1 fails first; only the driver's kill ends this rank


def _fail(folder: str) -> None:
    _record_pid(folder, 1)
    raise ZeroDivisionError("rank 1 broke")


def _exit_hard(folder: str) -> None:
    _record_pid(folder, 1)
    os._exit(3)  # a crash that no Python handler sees


def _lead_two_steps(*, on_step, should_stop) -> None:
    import time

    for step in range(1000):
        on_step(step, {"step": step})
        if should_stop():
            raise RunStopped(step + 1, "ckpt")
        time.sleep(0.05)


def _idle() -> None:
    pass


@pytest.fixture
def by_value():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_failing_rank_tears_down_every_rank_and_ray(ray_home, by_value):
    folder = ray_home / "pids"
    folder.mkdir()
    with pytest.raises(MilesError) as err:
        run_ray_ranks(2, functools.partial(_lead_into_barrier, str(folder)), _fail, (str(folder),))
    assert str(err.value) == "trainer rank 1 failed: ZeroDivisionError: rank 1 broke"
    pids = [int((folder / f"rank{rank}").read_text()) for rank in (0, 1)]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert not any(_alive(pid) for pid in pids)
    assert not ray.is_initialized()


def test_a_rank_process_that_dies_tears_down_every_rank_and_ray(ray_home, by_value):
    folder = ray_home / "pids"
    folder.mkdir()
    with pytest.raises(MilesError, match=r"^trainer rank [01] (died|failed)"):
        run_ray_ranks(2, functools.partial(_lead_into_barrier, str(folder)), _exit_hard, (str(folder),))
    pids = [int((folder / f"rank{rank}").read_text()) for rank in (0, 1)]
    assert not any(_alive(pid) for pid in pids)
    assert not ray.is_initialized()


def test_a_stop_request_reaches_rank_zero(ray_home, by_value):
    seen, asked = [], []

    def should_stop() -> bool:  # the CLI's Ctrl-C flag, raised once rank 0 has reported step 1
        asked.append(1)
        return len(seen) >= 2

    with pytest.raises(RunStopped) as err:
        run_ray_ranks(2, _lead_two_steps, _idle, (), on_step=lambda step, m: seen.append(m["step"]),
                      should_stop=should_stop)
    assert seen == list(range(len(seen))) and len(seen) >= 2
    assert err.value.step == seen[-1] + 1 and err.value.checkpoint == "ckpt"
    assert not ray.is_initialized()


def test_launched_servers_are_ray_actors_and_none_outlives_the_run(ray_home):
    """Rank 0 under --ray asks Ray for its rollout servers (`engine/ray_servers.py`); the run gives
    the in-process run's metrics, and after it no server process is left."""
    from miles_core.checkpoint.sources import resolve_model_source
    from miles_core.config import EngineConfig, SamplingConfig
    from miles_core.engine.http import SGLangHttpEngine
    from miles_core.engine.protocol import GenerateRequest
    from miles_core.engine.ray_servers import launch_ray_servers
    from miles_core.engine.servers import LaunchContext

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        cfg = EngineConfig(backend="sglang", launch=True, server="miles", num_gpus=0)
        cfg, fleet = launch_ray_servers(cfg, str(resolve_model_source("tiny-qwen3")), dtype="float32", on_gpu=False,
                                        context=LaunchContext())
        pid = ray.get(fleet.actors[0].server_pid.remote())
        assert len(fleet.urls) == 1
        engine = SGLangHttpEngine(cfg, urls=fleet.urls)
        answer = engine.generate([GenerateRequest([1, 2, 3], SamplingConfig(max_new_tokens=3), seed=0)])
        assert len(answer[0][0].output_ids) == 3
        assert _alive(pid)
        fleet.stop()
        assert not _alive(pid) and fleet.actors == []
    finally:
        ray.shutdown()
    one, two = ray_home / "one", ray_home / "two"
    served = ["--set", "engine.backend=sglang", "--set", "engine.launch=true", "--set", "engine.server=miles"]
    assert runner.invoke(app, [*COMMON, "--output-dir", str(one)]).exit_code == 0
    result = runner.invoke(app, [*COMMON, "--output-dir", str(two), "--ray", *served])
    assert result.exit_code == 0, result.output
    got, expected = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert without_noise(got) == without_noise(expected)
    assert not any(noise_differences(got, expected))


def test_colocated_servers_share_the_ranks_bundles_and_change_no_metric(ray_home):
    """`engine.colocate` under --ray: the server goes into rank 0's bundle (one CPU larger), is
    released while the trainer trains and synced after; the run gives the one-process metrics."""
    one, two = ray_home / "one", ray_home / "two"
    colocated = ["--set", "engine.backend=sglang", "--set", "engine.launch=true", "--set", "engine.server=miles",
                 "--set", "engine.colocate=true"]
    assert runner.invoke(app, [*COMMON, "--output-dir", str(one)]).exit_code == 0
    result = runner.invoke(app, [*COMMON, "--output-dir", str(two), "--ray", *colocated])
    assert result.exit_code == 0, result.output
    got, expected = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert without_noise(got) == without_noise(expected)
    trained = [m for m in got if "train/loss" in m]
    assert len(trained) == 2 and all(m["perf/engine_kv_released_gb"] > 0 for m in trained)  # the server released
    assert not ray.is_initialized()


def test_colocated_servers_need_as_many_trainer_ranks(ray_home):
    result = runner.invoke(app, [*COMMON, "--output-dir", str(ray_home / "run"), "--ray", "--set", "engine.backend=sglang",
                                 "--set", "engine.launch=true", "--set", "engine.server=miles", "--set",
                                 "engine.colocate=true", "--set", "engine.num_gpus=2"])
    assert result.exit_code == 2
    assert "engine.colocate under --ray places each rollout server on a trainer rank's GPU: 2 servers need at " \
           "least 2 trainer ranks, got 1" in " ".join(result.output.split())


def test_colocated_servers_take_one_gpu_each_and_only_in_a_trainer_ranks_bundle():
    from miles_core.config import EngineConfig
    from miles_core.engine.ray_servers import _colocated_group

    wide = EngineConfig(backend="sglang", launch=True, server="sglang", colocate=True, num_gpus=2, num_gpus_per_engine=2)
    with pytest.raises(MilesError, match="^engine.colocate under --ray puts each rollout server on one trainer "
                                         "rank's GPU: engine.num_gpus_per_engine must be 1, got 2$"):
        _colocated_group(wide, 1, on_gpu=True)
    one = EngineConfig(backend="sglang", launch=True, server="miles", colocate=True)
    with pytest.raises(MilesError, match="1 rollout servers need the bundles of as many trainer ranks, and this "
                                         "process is not a trainer rank placed by `miles train --ray`"):
        _colocated_group(one, 1, on_gpu=False)  # this test process is in no placement group
