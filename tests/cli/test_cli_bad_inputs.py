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


# The other commands, through the real CLI (cases already tested elsewhere are not repeated:
# convert's destination under a file in test_convert_safety.py, align-check's --batch-sizes and
# thresholds in test_align_check_cli.py, an unknown recipe name in test_cli_basics.py).
# (case, full argument list, expected part of the error line); {root}: the bad files, {tiny}: tiny-qwen3.
OTHER_CASES = [
    ("convert: missing source", ["convert", "{root}/nosuch", "{root}/out", "--to", "hf"], "source '{root}/nosuch' does not exist"),
    ("convert: not a checkpoint", ["convert", "{root}/a_file", "{root}/out", "--to", "torch_dist"],
     "'{root}/a_file' is a file but not a .gguf; expected a HF directory, a torch_dist checkpoint or a GGUF file"),
    ("convert: unsupported model_type", ["convert", "{root}/other_type", "{root}/out", "--to", "torch_dist"],
     "unknown model_type 'gpt_neox'"),
    ("convert: truncated safetensors", ["convert", "{root}/trunc", "{root}/out", "--to", "torch_dist"],
     "cannot read safetensors file '{root}/trunc/model.safetensors'"),
    ("convert: truncated GGUF", ["convert", "{root}/trunc.gguf", "{root}/out", "--to", "torch_dist"],
     "cannot read GGUF file '{root}/trunc.gguf' (truncated or not GGUF)"),
    ("convert: existing destination", ["convert", "{tiny}", "{root}", "--to", "torch_dist"],
     "output '{root}' already exists; remove it or choose another path"),
    ("convert: bad --to", ["convert", "{tiny}", "{root}/out", "--to", "onnx"], "unknown output format 'onnx'; expected one of: hf, torch_dist"),
    ("align-check: malformed recipe", ["align-check", "-r", "{root}/bad.toml"], "is not valid TOML: Expected ']'"),
    ("align-check: empty batch sizes", ["align-check", "-r", "tiny", "--batch-sizes", ",,"], "--batch-sizes ',,' must list integers >= 1"),
    ("serve: port out of range", ["serve", "--model", "{tiny}", "--port", "70000"], "--port must be in [0, 65535] (0 picks a free one), got 70000"),
    ("serve: bad host", ["serve", "--model", "{tiny}", "--host", "999.1.1.1", "--port", "0"], "cannot listen on 999.1.1.1:0"),
    ("serve: missing model", ["serve", "--model", "{root}/nosuch"], "model source '{root}/nosuch' is not a directory, a .gguf file or a built-in name"),
    ("serve: bad --set", ["serve", "--model", "{tiny}", "--set", "engine.max_batch_sise=4"], "unknown config key 'engine.max_batch_sise'"),
    ("serve: zero body limit", ["serve", "--model", "{tiny}", "--max-request-bytes", "0"], "--max-request-bytes must be >= 1, got 0"),
    ("serve: NaN batch window", ["serve", "--model", "{tiny}", "--batch-window-ms", "nan"], "--batch-window-ms must be a finite number >= 0, got nan"),
    ("recipes show: did you mean", ["recipes", "show", "tiny-dapoo"], "unknown recipe 'tiny-dapoo' (did you mean 'tiny-dapo'?)"),
    ("recipes show: malformed TOML", ["recipes", "show", "{root}/bad.toml"], "is not valid TOML: Expected ']' at the end of a table declaration (at line 1"),
    ("recipes show --resolved: malformed TOML", ["recipes", "show", "--resolved", "{root}/bad.toml"], "(at line 1"),
]


@pytest.mark.parametrize("case, args, expected", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_every_command_names_a_bad_input_in_one_line(case, args, expected, root, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("miles serve started serving"))
    values = {"root": root, "tiny": resolve_model_source("tiny-qwen3")}
    result = runner.invoke(app, [a.format(**values) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert expected.format(**values) in " ".join(result.stderr.split()), result.stderr
    assert not (root / "out").exists()
