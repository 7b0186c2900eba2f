"""`engine.colocate` with the in-process native engine (one device shared with the trainer): every
step releases the engine's memory before training (dropping its weights, or copying them to host
with `engine.weights_cpu_backup`) and takes it back before the sync, the optimizer state waits in
host memory meanwhile, and the run's rollouts and updates equal those of the run without
colocation bit for bit. On CPU the GPU metrics are absent and the GPU byte counts are 0."""

from __future__ import annotations

import pytest

from miles_core.config import load_config
from miles_core.engine.native import NativeEngine
from miles_core.rl.loop import run_training
from miles_core.train.native import NativeTrainer

LEARN = ["algo.entropy_coef=0.01", "loop.num_rollout=2"]  # a random tiny model's rewards are 0: entropy moves it
COMPARED = ("rollout/raw_reward", "rollout/response_len", "train/loss", "train/pg_loss", "train/grad_norm",
            "train/entropy_loss")


def _calls(monkeypatch, cls, name: str) -> list[dict]:
    calls, method = [], getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(kwargs)
        return method(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.mark.parametrize(("recipe", "backup"), [("tiny", False), ("tiny", True), ("tiny-deepseek", False)])
def test_colocated_run_takes_turns_and_changes_no_bit(tmp_path, monkeypatch, recipe, backup):
    """tiny-deepseek: MLA, MoE and MTP weights, every one of them dropped and synced again."""
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    plain = run_training(load_config(recipe, LEARN), tmp_path / "plain")
    released, resumed = _calls(monkeypatch, NativeEngine, "release_memory"), _calls(monkeypatch, NativeEngine, "resume_memory")
    offloaded = _calls(monkeypatch, NativeTrainer, "offload_optimizer")
    colocated = run_training(load_config(recipe, [*LEARN, "engine.colocate=true",
                                                  f"engine.weights_cpu_backup={str(backup).lower()}"]),
                             tmp_path / "colocated")
    assert len(released) == len(resumed) == len(offloaded) == 2  # once per step
    assert released == [{"keep_weights": backup}] * 2  # dropped: the sync after each resume wrote every weight
    for ours, theirs in zip(colocated.history, plain.history):
        assert {k: ours[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
        assert ours["train/grad_norm"] > 0
        assert ours["perf/engine_released_gb"] == 0 and ours["perf/optimizer_offloaded_gb"] == 0  # CPU
        assert ours["perf/engine_kv_released_gb"] > 0  # the pool itself is freed (host memory here)
        assert not any(key.startswith("perf/gpu_mem_") for key in ours)  # CUDA only
        assert not any(key.startswith("perf/engine_") for key in theirs)
    drop_times = lambda evals: [(step, {k: v for k, v in m.items() if k != "perf/eval_time"}) for step, m in evals]  # noqa: E731
    assert drop_times(colocated.evals) == drop_times(plain.evals)


@pytest.mark.gpu
def test_gpu_colocated_run_frees_the_engine_memory_while_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    overrides = [*LEARN, "model.device=cuda", "engine.colocate=true"]
    result = run_training(load_config("tiny", overrides), tmp_path / "gpu")
    for metrics in result.history:
        assert metrics["perf/engine_released_gb"] >= 0.9 * metrics["perf/engine_kv_released_gb"] > 0
        assert metrics["perf/gpu_mem_after_release_gb"] < metrics["perf/gpu_mem_during_rollout_gb"]
        assert metrics["perf/peak_gpu_memory_gb"] >= metrics["perf/gpu_mem_during_train_gb"]
    assert result.history[1]["perf/optimizer_offloaded_gb"] > 0
