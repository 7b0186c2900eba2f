"""Full checkpoints and exact resume (issue 21): a run stopped (in process), killed with SIGKILL
mid-step or mid-save, or stopped by SIGTERM, and resumed with `--resume auto` gives the same
metrics (timings aside) and bitwise the same final weights as an uninterrupted run, on CPU.
`algo.entropy_coef = 0.01` gives the random tiny models non-zero gradients, so the AdamW moments
and the prompt stream really have to come back."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.config import load_config
from miles_core.errors import RunStopped
from miles_core.rl.loop import run_training
from miles_core.rl.resume import truncate_metrics

runner = CliRunner()
ARGS = ["--set", "algo.entropy_coef=0.01", "--num-rollout", "4", "--save-interval", "2"]


def train(out, *args: str, recipe: str = "tiny"):
    return runner.invoke(app, ["train", "-r", recipe, *ARGS, "--output-dir", str(out), *args])


def records(run) -> list[dict]:
    """metrics.jsonl without the timings."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in lines]


def assert_same_run(run, reference) -> None:
    assert records(run) == records(reference)
    got = load_file(run / "checkpoints" / "step_000004" / "model.safetensors")
    want = load_file(reference / "checkpoints" / "step_000004" / "model.safetensors")
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert train(out).exit_code == 0
    return out


def _stopped_then_resumed(recipe: str, root):
    cfg = load_config(recipe, ["algo.entropy_coef=0.01", "loop.num_rollout=4", "loop.save_interval=2"])
    run_training(cfg, root / "ref")
    polls = iter(range(100))
    with pytest.raises(RunStopped) as stopped:
        run_training(cfg, root / "run", should_stop=lambda: next(polls) >= 3)  # before step 3
    assert stopped.value.checkpoint.name == "step_000003"  # the finished step is saved on the way out
    run_training(cfg, root / "run", resume="auto")
    assert_same_run(root / "run", root / "ref")


@pytest.mark.parametrize("recipe", ["tiny", "tiny-moe"])
def test_stop_and_resume_equals_the_uninterrupted_run(recipe, tmp_path):
    _stopped_then_resumed(recipe, tmp_path)


# `miles train` in a child that SIGKILLs itself: while training step 3, or inside the trainer
# state save of checkpoint step_000004 (after part of the file is written).
KILLED = textwrap.dedent("""
    import os, signal, sys
    import miles_core.rl.loop as loop
    from miles_core.train.native import NativeTrainer
    where = sys.argv[1]
    if where == "step":
        original = loop.prepare_train_batch
        def prepare(cfg, trainer, samples):
            if samples[0].metadata["rollout_id"] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(cfg, trainer, samples)
        loop.prepare_train_batch = prepare
    else:
        original = NativeTrainer._save_to
        def save(self, handle):
            if self.num_optimizer_steps == 4:
                handle.write(b"partial")
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, handle)
        NativeTrainer._save_to = save
    from miles_cli.app import main
    sys.argv = ["miles", "train", *sys.argv[2:]]
    main()
""")


@pytest.mark.parametrize("where", ["step", "save"])
def test_sigkill_mid_step_or_mid_save_then_resume_is_exact(where, tmp_path, reference):
    out = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", KILLED, where, "-r", "tiny", *ARGS, "--output-dir", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_000002\n"  # the previous checkpoint stays the latest
    if where == "save":
        assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".step_000004.miles-")]  # the torn save
    result = train(out, "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # stale temp removed
    assert_same_run(out, reference)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, reference):
    out = tmp_path / "run"
    script = "import sys; from miles_cli.app import main; sys.argv = ['miles', *sys.argv[1:]]; main()"
    child = subprocess.Popen([sys.executable, "-c", script, "train", "-r", "tiny", *ARGS, "--output-dir", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "COLUMNS": "1000"})
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert child.poll() is None, child.stderr.read()
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)  # during step 1 (or 2): that step finishes and is saved
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 143, stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert stderr.strip().splitlines()[-1] == (
        f"terminated; partial output in '{out}'; resume with: miles train -r tiny {' '.join(ARGS)} "
        f"--output-dir {out} --resume auto")
    assert len(records(out)) == int(latest[-6:])  # one record per finished step
    result = train(out, "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert_same_run(out, reference)


def test_a_changed_config_is_refused_with_the_keys_named(tmp_path, reference):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "-r", "tiny", *ARGS, "--set", "train.lr=3e-4", "--set",
                                 "sampling.temperature=0.5", "--resume", str(reference / "checkpoints" / "step_000002"),
                                 "--output-dir", str(out)])
    assert result.exit_code == 2
    line = " ".join(result.output.split())
    assert "the config changed where it matters (sampling.temperature: 1.0 -> 0.5; train.lr: 0.0001 -> 0.0003)" in line
    assert not out.exists()


def test_resume_path_into_a_new_folder_may_extend_the_run_and_keep_last(tmp_path, reference):
    out = tmp_path / "longer"
    result = runner.invoke(app, ["train", "-r", "tiny", *ARGS[:2], "--num-rollout", "6", "--save-interval", "1",
                                 "--keep-last", "2", "--resume", str(reference), "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert records(out)[:4] == records(reference)[:4] and [r["step"] for r in records(out)] == list(range(7))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000005", "step_000006"]


def test_slime_load_resumes_from_a_run_and_starts_fresh_from_an_empty_folder(tmp_path, reference):
    # --load is a miles option (no slime defaults); --save would bring them and change the config.
    result = runner.invoke(app, ["train", "-r", "tiny", *ARGS, "--num-rollout", "5", "--load", str(reference),
                                 "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(6))
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["train", "-r", "tiny", "--num-rollout", "1", "--load", str(empty), "--save", str(empty)])
    assert result.exit_code == 0, result.output
    assert "no complete checkpoint" in result.output


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from miles_core.train.native import NativeTrainer

    original = NativeTrainer._save_to

    def full(self, handle):
        if self.num_optimizer_steps == 4:
            raise OSError(errno.ENOSPC, "No space left on device", handle.name)
        original(self, handle)

    monkeypatch.setattr(NativeTrainer, "_save_to", full)
    out = tmp_path / "run"
    result = train(out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = " ".join(result.output.split())
    assert f"error: could not write checkpoint '{out}/checkpoints/step_000004' (No space left on device); " \
           f"'{out}/checkpoints/step_000002' is still the latest checkpoint" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002"]


def test_metrics_are_cut_back_to_the_checkpoint_and_a_torn_line_is_dropped(tmp_path):
    source = tmp_path / "metrics.jsonl"
    source.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2, "a": 3}\n{"step": 3, "a"')
    assert truncate_metrics(source, source, 2) == 2
    assert source.read_text() == '{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n'
    assert truncate_metrics(source, source, 5) == 2  # a torn line alone: every whole record kept
