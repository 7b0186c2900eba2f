"""The GPU benchmarks run end to end on CPU with tiny shapes (`--tiny --device cpu`): they must
not rot between GPU sessions. Their numbers on CPU mean nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.child_env import child_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["train_throughput.py", "grpo_step.py", "rollout_throughput.py"])
def test_benchmark_runs_tiny_on_cpu(script, tmp_path):
    env = child_env(MILES_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "result.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--tiny", "--device", "cpu", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "Card: CPU" in text and "command:" in text
    peer = {"train_throughput.py": "transformers", "grpo_step.py": "TRL GRPOTrainer",
            "rollout_throughput.py": "transformers tok/s"}[script]
    assert peer in text


def test_async_step_runs_quick_on_cpu(tmp_path):
    env = child_env(MILES_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "result.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "async_step.py"), "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "Card: CPU" in text and "command:" in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| sync") or line.startswith("| async")]
    assert rows == ["| sync", "| async", "| async+partial"]
    assert "| 2 | " in text  # the reward table has a row per step (3 steps)


def test_lowprec_runs_tiny_on_cpu(tmp_path):
    env = child_env(MILES_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "result.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "lowprec.py"), "--tiny", "--device", "cpu", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "Card: CPU" in text and "command:" in text and "torch references" in text
    assert [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| tiny")] == ["| tiny"] * 4
    assert [line.split(" | ")[0] for line in text.splitlines() if line[2:6] in ("bf16", "fp8 ", "int4")] == \
        ["| bf16", "| fp8", "| int4"]


def test_engine_host_overhead_runs_on_cpu(tmp_path):
    env = child_env(MILES_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "result.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "engine_host_overhead.py"), "--batches", "3,9",
                           "--steps", "5", "--repeats", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "command:" in text and "| schedule | stage | computed | sampler | record | other |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 3 ") or line.startswith("| 9 ")]
    assert [row.split(" | ")[0] for row in rows] == ["| 3", "| 9"]
    for row in rows:  # every phase is time spent (a phase wrapping a method no longer called reads < 0)
        assert all(float(cell.replace(",", "")) >= 0 for cell in row.strip("| ").split(" | ")[1:]), row


def test_finite_check_runs_tiny_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "finite_check.py"), "--shape", "tiny", "--device", "cpu"],
                          env=child_env(MILES_CACHE=str(tmp_path / "cache")), capture_output=True, text=True,
                          timeout=600, cwd=ROOT / "bench")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("per tensor (before)") == 2 and done.stdout.count("grouped (now)") == 2


def test_sync_call_overhead_runs_on_cpu(tmp_path):
    out = tmp_path / "result.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sync_call_overhead.py"), "--repeats", "2", "--out", str(out)],
                          env=child_env(MILES_CACHE=str(tmp_path / "cache")), capture_output=True, text=True,
                          timeout=600, cwd=ROOT / "bench")
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "command:" in text and "311 tensors" in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| local") or line.startswith("| HTTP")]
    assert rows == ["| local weight channel", "| HTTP"]
