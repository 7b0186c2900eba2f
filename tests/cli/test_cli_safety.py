"""Hostile-user inputs (issue 22): nothing already written is lost, every bad input is one line
and exit code 2, `--debug` works after the subcommand, and leaf commands show real usage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.sample import read_samples_jsonl

runner = CliRunner()
PROMPTS = "".join(json.dumps({"prompt": f"What is {i} + 1?", "label": str(i + 1)}) + "\n" for i in range(2))


def invoke(*args: str):
    return runner.invoke(app, list(args))


def rollout(*args: str):
    return invoke("rollout", "--recipe", "tiny", *args)


def one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(PROMPTS, encoding="utf-8")
    return path


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_rollout_never_writes_over_its_prompt_file(prompts, overwrite):
    line = one_error_line(rollout("--prompt-data", str(prompts), "-o", str(prompts), *overwrite))
    assert f"'{prompts}' would overwrite the input" in line
    assert prompts.read_text(encoding="utf-8") == PROMPTS


def test_rollout_never_writes_over_its_recipe(tmp_path, prompts):
    recipe = tmp_path / "mine.toml"
    text = 'extends = "tiny"\n'
    recipe.write_text(text)
    # `-o mine.toml` itself, and `-o mine.jsonl` whose recipe copy would be `mine.config.toml`.
    result = invoke("rollout", "-r", str(recipe), "--prompt-data", str(prompts), "-o", str(recipe), "--overwrite")
    assert "would overwrite the input" in one_error_line(result)
    (tmp_path / "x.config.toml").write_text(text)
    result = invoke("rollout", "-r", str(tmp_path / "x.config.toml"), "--prompt-data", str(prompts),
                    "-o", str(tmp_path / "x.jsonl"), "--overwrite")
    assert "recipe copy" in one_error_line(result)
    assert recipe.read_text() == text and (tmp_path / "x.config.toml").read_text() == text
    assert not (tmp_path / "x.jsonl").exists()


def test_rollout_refuses_an_existing_output_unless_overwrite(tmp_path, prompts):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    line = one_error_line(rollout("--prompt-data", str(prompts), "-o", str(out)))
    assert f"--output '{out}' already exists; pass --overwrite" in line
    assert out.read_text() == "precious\n"
    result = rollout("--prompt-data", str(prompts), "-o", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(list(read_samples_jsonl(out))) == 4  # 2 prompts x 2 samples
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.config.toml", "out.jsonl", "prompts.jsonl"]


def test_rollout_output_that_is_a_folder_or_under_a_file(tmp_path, prompts):
    assert "is a folder; expected a file path" in one_error_line(rollout("--prompt-data", str(prompts),
                                                                         "-o", str(tmp_path)))
    under = prompts / "out.jsonl"
    line = one_error_line(rollout("--prompt-data", str(prompts), "-o", str(under)))
    assert line == f"error: cannot write '{under}': '{prompts}' is a file, expected a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_rollout_output_in_a_read_only_folder(tmp_path, prompts):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    line = one_error_line(rollout("--prompt-data", str(prompts), "-o", str(folder / "out.jsonl")))
    assert f"folder '{folder}' is not writable" in line


def test_rollout_help_marks_output_required_and_shows_real_usage():
    for name in ("train", "rollout", "align-check", "convert"):
        result = invoke(name, "--help")
        assert result.exit_code == 0, result.output
        assert f"Usage: miles {name} [OPTIONS]" in result.output
        assert "COMMAND [ARGS]" not in result.output
    help_text = " ".join(invoke("rollout", "--help").output.split())
    assert "required unless --eval" in help_text and "--overwrite" in help_text


def test_non_utf8_prompt_file_is_one_line(tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    line = one_error_line(rollout("--prompt-data", str(data), "-o", str(tmp_path / "out.jsonl")))
    assert line == f"error: {data}:2: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8"


@pytest.mark.parametrize("command", [("recipes", "show"), ("recipes", "show", "--resolved"), ("train", "-r")])
def test_non_utf8_recipe_is_one_line(tmp_path, command):
    recipe = tmp_path / "bad.toml"
    recipe.write_bytes(b'description = "caf\xe9"\n')
    line = one_error_line(invoke(*command, str(recipe)))
    assert line.endswith("bad.toml' is not UTF-8 text (byte 0xe9 at offset 18); save it as UTF-8")


def test_train_output_dir_that_is_a_file_or_under_a_file(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    line = one_error_line(invoke("train", "-r", "tiny", "--output-dir", str(a_file)))
    assert line == f"error: --output-dir '{a_file}' is a file; expected a folder"
    line = one_error_line(invoke("train", "-r", "tiny", "--output-dir", str(a_file / "sub")))
    assert f"'{a_file}' is a file, expected a folder" in line
    assert a_file.read_text() == "keep"


def test_os_errors_are_one_line_naming_the_path(monkeypatch, tmp_path):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "metrics.jsonl"))

    monkeypatch.setattr("miles_core.rl.loop.run_training", full)
    result = invoke("train", "-r", "tiny", "--output-dir", str(tmp_path / "run"))
    line = one_error_line(result, code=1)
    assert line == f"error: No space left on device: '{tmp_path / 'metrics.jsonl'}'"


def test_debug_after_the_subcommand_keeps_exit_code_2(tmp_path):
    result = invoke("train", "--debug", "-r", "tiny", "--output-dir", str(tmp_path / "f"), "--num-rollout", "-1")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


# `miles train` in a child whose training loop has written a metrics line and then waits to be
# asked to stop (the loop polls `should_stop` between steps).
SLOW_TRAIN = textwrap.dedent("""
    import sys, time
    import miles_core.rl.loop as loop
    from miles_core.errors import RunStopped
    def slow(cfg, out, *, should_stop, **kwargs):
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text("{}\\n")
        print("ready", flush=True)
        while not should_stop():
            time.sleep(0.02)
        print("stopping", flush=True)
        raise RunStopped(1, None)
    loop.run_training = slow
    from miles_cli.app import main
    sys.argv = ["miles", "train", "-r", "tiny", "--output-dir", sys.argv[1]]
    main()
""")


def _signal_child(out, signals: list[int]):
    child = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "400"})
    for line in child.stdout:
        if line.strip() == "ready":
            break
    child.send_signal(signals[0])
    for line in child.stdout:
        if line.strip() == "stopping":
            break
    for signum in signals[1:]:
        child.send_signal(signum)
    _, stderr = child.communicate(timeout=60)
    return child.returncode, stderr


@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_during_train_stops_between_steps_and_says_how_to_resume(tmp_path, signum, code, word):
    out = tmp_path / "run"
    returncode, stderr = _signal_child(out, [signum])
    assert returncode == code, stderr
    assert stderr.strip().splitlines()[-1] == (f"{word}; partial output in '{out}'; resume with: miles train -r tiny "
                                               f"--output-dir {out} --resume auto")


def test_the_first_signal_asks_to_stop_and_a_second_aborts_at_once():
    from miles_cli.common import _catch_signals

    signals: list[int] = []
    with pytest.raises(KeyboardInterrupt), _catch_signals(signals, graceful=True):
        os.kill(os.getpid(), signal.SIGTERM)  # recorded only: the loop finishes its step
        assert signals == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGINT)  # raises here
        time.sleep(5)
    assert signals == [signal.SIGTERM, signal.SIGINT]


def test_train_on_a_killed_run_folder_removes_its_stale_checkpoint_temp(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = run / "checkpoints" / f".step_000002.miles-{int(done.stdout)}-x1.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    result = invoke("train", "-r", "tiny", "--output-dir", str(run))
    assert result.exit_code == 2  # the folder holds a run: refused, but the stale temp is gone
    assert not stale.exists() and (run / "metrics.jsonl").read_text() == "{}\n"
    assert f"note: removed '{stale}'" in " ".join(result.stderr.split())
