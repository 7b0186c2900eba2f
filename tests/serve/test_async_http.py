"""Async training (loop.mode = async) through the SGLang HTTP backend against `miles serve`: the
rollout thread drives the remote engine and loads each weight version from disk between steps;
the schedule depends on step numbers only, so every metric equals the in-process async run."""

from __future__ import annotations

import json

from miles_core.config import load_config
from miles_core.rl.loop import run_training
from tests.serve.conftest import start

ASYNC = ["loop.mode=async", "algo.use_tis=true", "algo.entropy_coef=0.01", "loop.num_rollout=3"]


def _metrics(path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def test_async_through_miles_serve_gives_the_in_process_metrics(tmp_path):
    run_training(load_config("tiny", ASYNC), tmp_path / "native")
    state, thread = start("tiny", allow_unauthenticated_weight_updates=True, allowed_model_roots=(str(tmp_path),))
    with thread as url:
        cfg = load_config("tiny", [*ASYNC, "engine.backend=sglang", f'engine.urls=["{url}"]'])
        run_training(cfg, tmp_path / "http")
        assert state.engine.weight_version == "3"  # every version reached the server, the last too
    native, http = _metrics(tmp_path / "native" / "metrics.jsonl"), _metrics(tmp_path / "http" / "metrics.jsonl")
    assert http == native
    assert [r["rollout/staleness_max"] for r in http[:3]] == [0.0, 1.0, 1.0]
