"""`miles rollout`: samples written as JSONL with the resolved recipe beside them, prompt files,
overrides, and bad inputs refused with one line, exit code 2 and no output file."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from miles_cli.app import app
from miles_core.checkpoint.sources import resolve_model_source
from miles_core.config import load_config
from miles_core.checkpoint.loading import load_tokenizer
from miles_core.sample import Status, read_samples_jsonl

runner = CliRunner()

PROMPTS = [
    {"prompt": "What is 2 + 3?", "label": "5"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
     "label": "red", "metadata": {"source": "hand"}},
    {"prompt": "Say hi"},
]
# What the tiny model's ChatML template renders for each prompt (tiny recipe: no system prompt).
RENDERED = [
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n",
]


def rollout(*args: str):
    return runner.invoke(app, ["rollout", "--recipe", "tiny", *args])


def write_jsonl(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def table_rows(output: str) -> dict[str, str]:
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


@pytest.fixture(scope="module")
def tiny_rollout(tmp_path_factory):
    out = tmp_path_factory.mktemp("rollout") / "out.jsonl"
    result = rollout("-o", str(out))
    return result, out


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_source("tiny-qwen3"))


def test_rollout_writes_one_sample_per_prompt_and_draw(tiny_rollout):
    result, out = tiny_rollout
    assert result.exit_code == 0, result.output
    samples = list(read_samples_jsonl(out))
    assert len(samples) == 32  # 16 prompts x 2 samples
    assert [s.index for s in samples] == list(range(32))
    assert [s.group_index for s in samples] == [i // 2 for i in range(32)]


def test_rollout_samples_are_self_consistent(tiny_rollout):
    _, out = tiny_rollout
    for s in read_samples_jsonl(out):
        assert 1 <= s.response_length <= 8  # tiny: max_new_tokens = 8
        assert len(s.rollout_log_probs) == s.response_length
        assert len(s.loss_mask) == s.response_length
        assert s.prompt_length > 0
        assert all(lp <= 0 for lp in s.rollout_log_probs)
        assert s.weight_versions == ["0"] * s.response_length
        reason = s.metadata["finish_reason"]["type"]
        assert s.status == {"length": Status.TRUNCATED, "stop": Status.COMPLETED}[reason]
        assert s.reward is None  # rollout does not score


def test_rollout_groups_share_the_prompt_and_differ_in_the_response(tiny_rollout):
    _, out = tiny_rollout
    samples = list(read_samples_jsonl(out))
    for first, second in zip(samples[::2], samples[1::2]):
        assert first.prompt == second.prompt and first.label == second.label
        assert first.tokens[: first.prompt_length] == second.tokens[: second.prompt_length]
        assert first.response_tokens != second.response_tokens


def test_rollout_carries_task_labels(tiny_rollout):
    _, out = tiny_rollout
    for s in read_samples_jsonl(out):
        meta = s.metadata
        assert s.prompt == f"What is {meta['a']} {meta['op']} {meta['b']}?"
        assert s.label == str(meta["a"] + meta["b"])


def test_rollout_writes_the_resolved_config_next_to_the_output(tiny_rollout):
    _, out = tiny_rollout
    config_file = out.with_name("out.config.toml")
    assert config_file.is_file()
    assert load_config(str(config_file)) == load_config("tiny")


def test_rollout_prints_a_summary_table(tiny_rollout):
    result, out = tiny_rollout
    rows = table_rows(result.output)
    samples = list(read_samples_jsonl(out))
    assert rows["prompts"] == "16"
    assert rows["samples"] == "32"
    assert rows["response tokens"] == str(sum(s.response_length for s in samples))
    assert float(rows["tokens/s"]) > 0


def test_rollout_uses_a_prompt_file(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps(p) for p in PROMPTS])
    out = tmp_path / "out.jsonl"
    result = rollout("-o", str(out), "--prompt-data", str(data))
    assert result.exit_code == 0, result.output
    samples = list(read_samples_jsonl(out))
    assert len(samples) == 6  # 3 prompts x 2 samples
    for s in samples:
        record = PROMPTS[s.group_index]
        assert s.prompt == record["prompt"]
        assert s.label == record.get("label")
        assert tokenizer.decode(s.tokens[: s.prompt_length]) == RENDERED[s.group_index]
    assert samples[2].metadata["source"] == "hand"
    resolved = load_config(str(tmp_path / "out.config.toml"))
    assert (resolved.data.path, resolved.data.task) == (str(data), "")


def test_rollout_set_overrides_samples_per_prompt(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps(p) for p in PROMPTS])
    out = tmp_path / "out.jsonl"
    result = rollout("-o", str(out), "--prompt-data", str(data), "--set", "sampling.n_samples_per_prompt=3")
    assert result.exit_code == 0, result.output
    samples = list(read_samples_jsonl(out))
    assert [s.group_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert table_rows(result.output)["samples"] == "9"
    assert load_config(str(tmp_path / "out.config.toml")).sampling.n_samples_per_prompt == 3


# -- bad inputs ------------------------------------------------------------------------------------

def assert_refused(result, out, *fragments: str) -> None:
    """Exit code 2, one `error:` line naming the problem, no traceback, nothing written."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    written = sorted(p.name for p in out.parent.iterdir() if p.name.startswith(("out", ".out")))
    assert written == []


def test_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps(PROMPTS[0]), '{"prompt": "x"'])
    out = tmp_path / "out.jsonl"
    assert_refused(rollout("-o", str(out), "--prompt-data", str(data)), out, f"{data}:2: malformed JSON")


def test_missing_prompt_key_is_named_by_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps(PROMPTS[0]), json.dumps({"question": "x"})])
    out = tmp_path / "out.jsonl"
    assert_refused(rollout("-o", str(out), "--prompt-data", str(data)), out,
                   f"{data}:2: missing key 'prompt'", "question")


def test_nonexistent_prompt_file(tmp_path):
    out = tmp_path / "out.jsonl"
    missing = tmp_path / "nope.jsonl"
    assert_refused(rollout("-o", str(out), "--prompt-data", str(missing)), out, f"file not found: '{missing}'")


def test_prompt_longer_than_the_context(tmp_path):
    out = tmp_path / "out.jsonl"
    assert_refused(rollout("-o", str(out), "--set", "engine.max_context_len=8"), out,
                   "task 'arithmetic' record 0: prompt", "has 33 tokens; the limit is 7 (context 8")


def test_unknown_model_source(tmp_path):
    out = tmp_path / "out.jsonl"
    assert_refused(rollout("-o", str(out), "--set", "model.source=/nonexistent"), out,
                   "model source '/nonexistent'", "tiny-qwen3")


def test_corrupt_checkpoint_names_the_weights_file(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(resolve_model_source("tiny-qwen3"), model_dir)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out.jsonl"
    assert_refused(rollout("-o", str(out), "--set", f"model.source={model_dir}"), out,
                   f"cannot read safetensors file '{weights}'")
