"""`engine.backend = "sglang"` against `miles serve`: a training run gives the in-process metrics,
weights travel by disk and the version is checked, a dead server is taken out and its requests
retried, and `engine.launch` builds SGLang's command line."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from miles_cli.app import app

from miles_core.config import EngineConfig, SamplingConfig, SyncConfig, load_config
from miles_core.engine.http import SGLangHttpEngine
from miles_core.engine.protocol import GenerateRequest
from miles_core.engine.sglang_launch import launch_command
from miles_core.errors import MilesError
from miles_core.rl.loop import run_training
from miles_core.sync import transport_name
from tests.serve.conftest import start


def _metrics(path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


@pytest.mark.parametrize("recipe", ["tiny", "tiny-moe"])
def test_miles_train_through_miles_serve_gives_the_in_process_metrics(tmp_path, recipe):
    """Same seeds, same batches: tokens, log-probs, finish reasons and (MoE) routed experts
    round-trip exactly, so every non-timing metric is equal."""
    run_training(load_config(recipe), tmp_path / "native")
    state, thread = start(recipe, allow_unauthenticated_weight_updates=True, allowed_model_roots=(str(tmp_path),))
    with thread as url:
        args = ["train", "--recipe", recipe, "--output-dir", str(tmp_path / "http"),
                "--set", "engine.backend=sglang", "--set", f'engine.urls=["{url}"]']
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert state.engine.weight_version == "2"
    assert _metrics(tmp_path / "http" / "metrics.jsonl") == _metrics(tmp_path / "native" / "metrics.jsonl")
    assert [p.name for p in (tmp_path / "http" / "weight_sync").iterdir()] == ["v2"]


def test_routed_experts_round_trip_exactly(tmp_path):
    state, thread = start("tiny-moe")
    with thread as url:
        cfg = EngineConfig(backend="sglang", urls=(url,), return_routed_experts=True)
        engine = SGLangHttpEngine(cfg, urls=(url,), routed_experts_topk=state.facts.hf_config["num_experts_per_tok"])
        remote = engine.generate(_requests(2))
    local = state.engine.generate(_requests(2))
    for remote_group, local_group in zip(remote, local):
        for r, g in zip(remote_group, local_group):
            assert r.routed_experts.dtype == g.routed_experts.dtype and (r.routed_experts == g.routed_experts).all()
            assert r.routed_experts.shape[0] == 3 + len(g.output_ids) - 1


def _requests(num: int) -> list[GenerateRequest]:
    sampling = SamplingConfig(max_new_tokens=3, n_samples_per_prompt=2)
    return [GenerateRequest(input_ids=[1, 2, 3 + k], sampling=sampling, seed=k, rid=f"r{k}") for k in range(num)]


def test_a_dead_server_is_taken_out_and_its_requests_retried(served):
    url, state = served
    second_state, second = start()
    with second as second_url:
        engine = SGLangHttpEngine(EngineConfig(backend="sglang", urls=(url, second_url), health_retries=1),
                                  urls=(url, second_url))
        both = engine.generate(_requests(6))
    reference = state.engine.generate(_requests(6))
    assert [[g.output_ids for g in group] for group in both] == [[g.output_ids for g in group] for group in reference]
    again = engine.generate(_requests(6))  # the second server is gone: everything goes to the first
    assert [s.alive for s in engine.servers] == [True, False]
    assert [[g.output_ids for g in group] for group in again] == [[g.output_ids for g in group] for group in reference]
    engine.servers[0].url = "http://127.0.0.1:9"  # nothing listens there
    with pytest.raises(MilesError, match="no SGLang server is left"):
        engine.generate(_requests(1))
    assert transport_name(SyncConfig(), engine) == "disk"


def test_an_unreachable_server_fails_with_one_line():
    with pytest.raises(MilesError, match="not healthy after 1 attempts"):
        SGLangHttpEngine(EngineConfig(backend="sglang", urls=("http://127.0.0.1:9",), health_retries=1),
                         urls=("http://127.0.0.1:9",))


def test_sglang_backend_needs_urls_and_in_process_sync_is_refused():
    with pytest.raises(MilesError, match="needs urls"):
        load_config("tiny", ["engine.backend=sglang"])


def test_launch_command_is_sglangs_launch_server():
    cfg = EngineConfig(backend="sglang", launch=True, api_key="k", return_routed_experts=True,
                       sglang_args=("--tp", "2", "--mem-fraction-static", "0.7"))
    assert launch_command(cfg, "/models/m", "127.0.0.1", 30001) == [
        sys.executable, "-m", "sglang.launch_server", "--model-path", "/models/m", "--host", "127.0.0.1",
        "--port", "30001", "--api-key", "k", "--enable-return-routed-experts", "--tp", "2",
        "--mem-fraction-static", "0.7"]
    colocated = EngineConfig(backend="sglang", launch=True, colocate=True)
    assert launch_command(colocated, "/m", "h", 1)[-1] == "--enable-memory-saver"  # the weights dropped at release
    kept = EngineConfig(backend="sglang", launch=True, colocate=True, weights_cpu_backup=True)
    assert launch_command(kept, "/m", "h", 1)[-2:] == ["--enable-memory-saver", "--enable-weights-cpu-backup"]
