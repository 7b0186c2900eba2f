"""`miles convert` under hostile conditions (issue 22): impossible destinations are one line,
Ctrl-C and SIGTERM leave nothing half-written and exit 130/143 with one line, and temporaries
left by a killed run (kill -9) are removed by the next run of the same destination."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from miles_cli.app import app

runner = CliRunner()


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_destination_under_a_file_is_one_line(tiny_hf, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    result = runner.invoke(app, ["convert", str(tiny_hf("qwen3")), str(a_file / "out"), "--to", "torch_dist"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: cannot write '{a_file / 'out'}': '{a_file}' is a file, expected a folder"
    assert a_file.read_text() == "keep"


def test_stale_temporaries_of_a_killed_run_are_removed(tiny_hf, tmp_path):
    dst = tmp_path / "out"
    stale = tmp_path / f".out.miles-{dead_pid()}-abc123.tmp"
    (stale / "release").mkdir(parents=True)
    (stale / "release" / "__0_0.distcp").write_bytes(b"\0" * 2**20)
    live = tmp_path / f".out.miles-{os.getpid()}-def456.tmp"  # a run still going: kept
    live.mkdir()
    foreign = tmp_path / ".out.xyz.tmp"  # not our pattern: kept
    foreign.mkdir()
    result = runner.invoke(app, ["convert", str(tiny_hf("qwen3")), str(dst), "--to", "torch_dist"])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists() and foreign.exists()
    note = " ".join(result.stderr.split())
    assert f"note: removed '{stale}' (1.0 MiB), an unfinished write of 'out' left by process" in note


# Run `miles convert` in a child whose checkpoint writer blocks half-way (a file already written
# in the temp folder) and, like some libraries do, turns the KeyboardInterrupt into a ValueError.
SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    import miles_core.checkpoint.convert as convert
    real = convert.save_hf_checkpoint
    def slow(out_dir, tensors, *args, **kwargs):
        (out_dir / "partial.safetensors").write_bytes(b"x" * 1000)
        print("ready", flush=True)
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            raise ValueError("I/O operation on closed file")
    convert.save_hf_checkpoint = slow
    from miles_cli.app import main
    sys.argv = ["miles", "convert", *sys.argv[1:]]
    main()
""")


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_during_convert_is_one_line_and_leaves_nothing(tiny_hf, tmp_path, signum, code, word):
    dist = tmp_path / "dist"
    assert runner.invoke(app, ["convert", str(tiny_hf("qwen3")), str(dist), "--to", "torch_dist"]).exit_code == 0
    dst = tmp_path / "hf"
    child = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(dist), str(dst), "--to", "hf"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "COLUMNS": "200"})
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == code, stderr
    assert stderr.strip() == word
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]
