"""`engine.launch` with `miles serve` servers: two CPU servers started for a `miles train --recipe
tiny` run serve both steps, take the weights through the `disk` sync (read back bitwise from every
server: `sync.check_weight_update_equal`), give the in-process engine's rewards and gradients, and
are gone when the run ends, fails at start, fails mid-run, or when a server dies during start-up
(one clear error). Placement and command lines are checked without starting anything."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.config import EngineConfig, load_config
from miles_core.engine import servers
from miles_core.engine.servers import LaunchContext, miles_command, server_gpus
from miles_core.errors import MilesError, RunStopped
from miles_core.rl import loop

runner = CliRunner()
TWO_SERVERS = ["--set", "engine.backend=sglang", "--set", "engine.launch=true", "--set", "engine.server=miles",
               "--set", "engine.num_gpus=2", "--set", "sync.check_weight_update_equal=true"]
LEARN = ["--set", "algo.entropy_coef=0.01"]  # rewards of a random tiny model are all 0: entropy moves the weights


@pytest.fixture()
def started(monkeypatch, tmp_path):
    """Every server (`LaunchedServer`: its process and log) the test starts; logs under `tmp_path`."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    launched = []
    start = servers._start

    def recording(*args, **kwargs):
        launched.append(start(*args, **kwargs))
        return launched[-1]

    monkeypatch.setattr(servers, "_start", recording)
    return launched


def _gone(launched) -> bool:
    """Every server process was reaped, and no process with its pid or in its group is left."""
    for server in launched:
        if server.process.returncode is None:
            return False
        for check in (os.kill, os.killpg):
            try:
                check(server.process.pid, 0)
            except ProcessLookupError:
                continue
            return False
    return True


def _train(tmp_path, name: str, *extra: str):
    result = runner.invoke(app, ["train", "--recipe", "tiny", "--output-dir", str(tmp_path / name), *LEARN, *extra])
    history = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] \
        if (tmp_path / name / "metrics.jsonl").is_file() else []
    return result, history


def test_two_miles_servers_serve_a_colocated_run_with_disk_sync_and_stop_after_it(tmp_path, monkeypatch, started):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    colocate = ["--set", "engine.colocate=true"]  # the servers release their memory while the trainer trains
    result, served = _train(tmp_path, "served", *TWO_SERVERS, *colocate)
    assert result.exit_code == 0, result.output
    assert len(started) == 2 and _gone(started)
    _, local = _train(tmp_path, "local", *colocate)  # the in-process engine
    for ours, theirs in zip(served[:2], local[:2]):  # same seeds per sample: the same rollouts and update
        for key in ("rollout/raw_reward", "rollout/response_len", "train/grad_norm", "train/pg_loss", "train/loss"):
            assert ours[key] == theirs[key], key
        assert ours["train/grad_norm"] > 0 and ours["perf/sync_time"] > 0  # weights moved and were synced
        assert ours["perf/engine_kv_released_gb"] == 2 * theirs["perf/engine_kv_released_gb"] > 0  # two pools
    assert len(served) == 3 and served[2]["step"] == 2  # two steps, then the final eval
    assert not any(server.log_path.parent.exists() for server in started)  # logs of a clean run removed


def test_a_run_that_fails_mid_way_or_at_start_leaves_no_server(tmp_path, monkeypatch, started):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    step = loop._rollout_step

    def failing(cfg, parts, index):
        if index == 1:
            raise MilesError("a failure in step 1")
        return step(cfg, parts, index)

    monkeypatch.setattr(loop, "_rollout_step", failing)
    result, history = _train(tmp_path, "mid", *TWO_SERVERS)
    assert result.exit_code != 0 and "a failure in step 1" in result.output
    assert len(history) == 1 and len(started) == 2 and _gone(started)
    # at start: the engine is up, then the weight sync is refused
    result, _ = _train(tmp_path, "start", *TWO_SERVERS, "--set", "sync.transport=inprocess")
    assert result.exit_code != 0 and "'inprocess' cannot reach an engine in other processes" in result.output
    assert len(started) == 4 and _gone(started)


def test_an_interrupted_run_saves_and_leaves_no_server(tmp_path, monkeypatch, started):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    cfg = load_config("tiny", [item for item in TWO_SERVERS if item != "--set"])
    steps = []
    with pytest.raises(RunStopped) as stopped:  # Ctrl-C: the handler asks the loop to stop between steps
        loop.run_training(cfg, tmp_path / "stopped", on_step=lambda step, _: steps.append(step),
                          should_stop=lambda: len(steps) == 1)
    assert stopped.value.checkpoint.name == "step_000001"  # the finished step (one update) was saved
    assert len(started) == 2 and _gone(started)


def test_a_server_that_dies_during_start_up_is_one_clear_error(tmp_path, monkeypatch, started):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    bad = ["--set", 'engine.sglang_args=["--set", "engine.block_size=3"]']
    result, _ = _train(tmp_path, "dies", *TWO_SERVERS, *bad)
    assert result.exit_code != 0
    message = "".join(result.output.split("\n"))  # the console wraps long lines
    found = re.search(r"engine server [01] \(http://127\.0\.0\.1:\d+, CPU, pid \d+\) exited with code 2 during "
                      r"start-up: error: engine: block_size must be a power of two >= 16, got 3 \(log: (\S+)\)", message)
    assert found, result.output  # both servers get the bad option; whichever exits first is named
    assert len(started) == 2 and _gone(started)
    assert not (tmp_path / "dies").exists()  # a failed start leaves no run folder
    assert Path(found.group(1)).is_file()  # kept: the error names it


def test_placement_after_the_trainer_or_on_its_gpus():
    cfg = EngineConfig(backend="sglang", launch=True, server="sglang", num_gpus=4, num_gpus_per_engine=2)
    assert server_gpus(cfg, trainer_gpus=2, available=8) == [[2, 3], [4, 5]]
    colocated = EngineConfig(backend="sglang", launch=True, server="sglang", num_gpus=4, num_gpus_per_engine=2,
                             colocate=True)
    assert server_gpus(colocated, trainer_gpus=2, available=4) == [[0, 1], [2, 3]]
    with pytest.raises(MilesError, match=r"^engine servers: 2 x 2 GPUs \(engine.num_gpus = 4, num_gpus_per_engine = "
                                         r"2\) after the trainer's 2 GPUs need 6 GPUs; this machine has 5$"):
        server_gpus(cfg, trainer_gpus=2, available=5)
    one = EngineConfig(backend="sglang", launch=True, server="miles")
    assert server_gpus(one, trainer_gpus=1, available=2) == [[1]]  # one server by default
    assert server_gpus(EngineConfig(backend="sglang", launch=True, server="miles", num_gpus=2), trainer_gpus=1,
                       available=None) == [[], []]  # CPU: no GPU counted


def test_gpu_ids_go_through_this_process_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert servers._physical([1, 2]) == ["5", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert servers._physical([1, 2]) == ["1", "2"]


def test_miles_command_serves_the_runs_model_and_engine_settings():
    cfg = EngineConfig(backend="sglang", launch=True, server="miles", api_key="k", max_batch_size=8,
                       sglang_args=("--batch-window-ms", "1"))
    command = miles_command(cfg, "/models/m", "127.0.0.1", 30001, dtype="bfloat16", on_gpu=True,
                            context=LaunchContext(weight_roots=("/runs/r/weight_sync",), alignment_mode="invariant"))
    sets = ["model.dtype=\"bfloat16\"", "model.device=\"cuda\"", "alignment.mode=\"invariant\"",
            "engine.max_batch_size=8", "engine.max_context_len=0", "engine.mem_fraction=0.5", "engine.num_kv_blocks=0",
            "engine.block_size=64", "engine.max_num_batched_tokens=16384", "engine.weights=\"dense\"",
            "engine.cuda_graphs=true", "engine.overlap=\"auto\"", "engine.return_routed_experts=false"]
    assert command == [sys.executable, "-m", "miles_cli.app", "serve", "--model", "/models/m", "--host", "127.0.0.1",
                       "--port", "30001", "--api-key", "k", "--allowed-model-root", "/runs/r/weight_sync",
                       *[part for item in sets for part in ("--set", item)], "--batch-window-ms", "1"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["engine.backend=sglang", "engine.launch=true", "engine.server=miles", "engine.num_gpus_per_engine=2"],
     "num_gpus_per_engine must be 1 for the native engine (no tensor parallelism; backend 'sglang', server 'miles'), "
     "got 2"),
    (["engine.num_gpus=2"], "num_gpus = 2 places servers on GPUs of their own: needs backend = 'sglang' with launch = "
                            "true"),
    (["engine.backend=sglang", "engine.launch=true", "engine.num_gpus=3", "engine.num_gpus_per_engine=2"],
     "num_gpus (3) must be a multiple of num_gpus_per_engine (2)"),
    (["engine.backend=sglang", "engine.launch=true", "engine.num_gpus=2", 'engine.urls=["http://127.0.0.1:1"]'],
     "num_gpus / num_gpus_per_engine = 2 servers, but urls names 1"),
    (["engine.num_gpus_per_engine=0"], "num_gpus_per_engine must be >= 1, got 0"),
    (["engine.launch=true"], "launch = true starts servers for backend 'sglang' (the HTTP client), got backend "
                             "'native'"),
    (["engine.colocate=true", "loop.mode=async", "algo.use_tis=true"],
     "engine.colocate takes turns on the GPUs (generate, then train): needs loop.mode = 'sync', got 'async'"),
    (["engine.colocate=true", "train.backend=megatron"],
     "engine.colocate offloads the optimizer of train.backend 'native' or 'fsdp', got 'megatron'"),
])
def test_placement_config_errors(overrides, message):
    with pytest.raises(MilesError, match=re.escape(message)):
        load_config("tiny", overrides)
