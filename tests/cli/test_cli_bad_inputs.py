"""Every bad input of issue 21's list, through the real CLI (`miles train`, and `miles rollout`
where it reads the same input): one `error:` line naming the value and what was expected, exit
code 2, no traceback. Disk full during a save is in test_resume.py (it needs a running save)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.checkpoint.sources import resolve_model_source

runner = CliRunner()


def _files(root):
    """The bad inputs on disk: recipe, prompt files, checkpoints."""
    (root / "bad.toml").write_text("[train\nlr = 1\n")
    (root / "empty.jsonl").write_text("\n")
    (root / "bad.jsonl").write_text('{"prompt": "1+1", "label": "2"}\n{"prompt": \n')
    source = resolve_model_source("tiny-qwen3")
    for name in ("trunc", "other_type"):
        shutil.copytree(source, root / name)
    weights = root / "trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = json.loads((root / "other_type" / "config.json").read_text())
    (root / "other_type" / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    (root / "trunc.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 10)
    (root / "a_file").write_text("")


# (case, arguments after the command, expected part of the error line); {root} is the folder above.
CASES = [
    ("malformed TOML", ["-r", "{root}/bad.toml"], "is not valid TOML: Expected ']' at the end of a table declaration (at line 1"),
    ("unknown key", ["--set", "train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'lr'?)"),
    ("wrong type", ["--set", "train.lr=abc"], "config key 'train.lr' expects float, got 'abc' (str)"),
    ("non-positive size", ["--set", "rollout.batch_size=0"], "batch_size must be in [1, 1048576], got 0"),
    ("non-positive max_bad_steps", ["--set", "train.max_bad_steps=0"], "max_bad_steps must be >= 1, got 0"),
    ("negative keep_last", ["--keep-last", "-1"], "keep_last must be >= 0, got -1"),
    ("empty dataset", ["--set", "data.task=''", "--set", "data.path='{root}/empty.jsonl'"], "'{root}/empty.jsonl' has no prompts; expected at least one record"),
    ("malformed JSONL", ["--set", "data.task=''", "--set", "data.path='{root}/bad.jsonl'"], "{root}/bad.jsonl:2: malformed JSON"),
    ("prompt over the context", ["--set", "engine.max_context_len=4"], "16 of 16 prompts are too long"),
    ("unsupported model_type", ["--set", "model.source='{root}/other_type'"], "unknown model_type 'gpt_neox'; expected one of"),
    ("truncated safetensors", ["--set", "model.source='{root}/trunc'"], "cannot read safetensors file '{root}/trunc/model.safetensors'"),
    ("truncated GGUF", ["--set", "model.source='{root}/trunc.gguf'"], "cannot read GGUF file '{root}/trunc.gguf' (truncated or not GGUF)"),
    ("unwritable output dir", ["--output-dir", "{root}/a_file/run"], "'{root}/a_file' is a file, expected a folder"),
    ("resume without a checkpoint", ["--resume", "{root}/a_file"], "no full checkpoint in '{root}/a_file'"),
    ("resume auto without a run folder", ["--resume", "auto"], "--resume auto continues the run in --output-dir"),
]
ROLLOUT = {"malformed TOML", "unknown key", "wrong type", "empty dataset", "malformed JSONL", "prompt over the context",
           "unsupported model_type", "truncated safetensors", "truncated GGUF"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    _files(folder)
    return folder


def _invoke(command: str, args: list[str], root, tmp_path):
    args = [a.format(root=root) for a in args]
    recipe = [] if "-r" in args else ["-r", "tiny"]
    if command == "train":
        out = [] if "--output-dir" in args or "auto" in args else ["--output-dir", str(tmp_path / "run")]
    else:
        out = ["-o", str(tmp_path / "out.jsonl")]
    return runner.invoke(app, [command, *recipe, *args, *out])


@pytest.mark.parametrize("command, case, args, expected",
                         [("train", *c) for c in CASES] + [("rollout", *c) for c in CASES if c[0] in ROLLOUT],
                         ids=lambda v: v if isinstance(v, str) and " " in v or v in ("train", "rollout") else "")
def test_every_bad_input_is_one_clear_line(command, case, args, expected, root, tmp_path):
    result = _invoke(command, args, root, tmp_path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expected.format(root=root) in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "run").exists()  # a failed start leaves no run folder
