"""Prompt loading from JSONL, parquet and built-in tasks, and every bad-input error."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from miles_core.config import ArithmeticConfig, DataConfig
from miles_core.data import load_prompts
from miles_core.errors import MilesError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {there}"}]


def _jsonl(tmp_path: Path, records: list, name: str = "prompts.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _parquet(tmp_path: Path, records: list[dict], name: str = "prompts.parquet") -> Path:
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)
    return path


def _error(cfg: DataConfig) -> str:
    with pytest.raises(MilesError) as info:
        load_prompts(cfg)
    return str(info.value)


def test_jsonl_with_custom_keys(tmp_path):
    path = _jsonl(tmp_path, [
        {"question": "What is 2 + 2?", "answer": "4", "info": {"source": "a"}},
        {"question": CHAT, "answer": 7},
        {"question": "No label here"},
    ])
    cfg = DataConfig(path=str(path), input_key="question", label_key="answer", metadata_key="info")
    samples = load_prompts(cfg)
    assert [s.index for s in samples] == [0, 1, 2]
    assert [s.group_index for s in samples] == [0, 1, 2]
    assert [s.prompt for s in samples] == ["What is 2 + 2?", CHAT, "No label here"]
    assert [s.label for s in samples] == ["4", 7, None]
    assert [s.metadata for s in samples] == [{"source": "a"}, {}, {}]
    assert all(s.tokens == [] for s in samples)


def test_parquet_with_custom_keys_across_batches(tmp_path):
    rows = [{"q": f"prompt {i}", "a": str(i), "m": {"id": i}} for i in range(5)]
    path = _parquet(tmp_path, rows)
    samples = load_prompts(DataConfig(path=str(path), input_key="q", label_key="a", metadata_key="m"))
    assert [s.prompt for s in samples] == [f"prompt {i}" for i in range(5)]
    assert [s.label for s in samples] == ["0", "1", "2", "3", "4"]
    assert [s.metadata for s in samples] == [{"id": i} for i in range(5)]


def test_parquet_chat_messages_and_null_metadata(tmp_path):
    rows = [{"prompt": CHAT, "metadata": None}, {"prompt": CHAT[1:], "metadata": None}]
    samples = load_prompts(DataConfig(path=str(_parquet(tmp_path, rows))))
    assert [s.prompt for s in samples] == [CHAT, CHAT[1:]]
    assert [s.metadata for s in samples] == [{}, {}]


def test_max_prompts_keeps_the_first_n_in_file_order(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": f"p{i}"} for i in range(10)])
    samples = load_prompts(DataConfig(path=str(path), max_prompts=3))
    assert [s.prompt for s in samples] == ["p0", "p1", "p2"]


def test_builtin_task():
    cfg = DataConfig(task="arithmetic", arithmetic=ArithmeticConfig(num_prompts=4, operators="*"), max_prompts=3)
    samples = load_prompts(cfg)
    assert [s.index for s in samples] == [0, 1, 2]
    for s in samples:
        assert s.prompt == f"What is {s.metadata['a']} * {s.metadata['b']}?"
        assert s.label == str(s.metadata["a"] * s.metadata["b"])


def test_builtin_task_ignores_file_keys():
    cfg = DataConfig(task="arithmetic", input_key="question", arithmetic=ArithmeticConfig(num_prompts=2))
    assert len(load_prompts(cfg)) == 2


def test_unknown_task_suggests_the_closest():
    message = _error(DataConfig(task="arithmatic"))
    assert "unknown task 'arithmatic'" in message and "did you mean 'arithmetic'" in message


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt\nhi\n")
    message = _error(DataConfig(path=str(path)))
    assert "prompts.csv" in message and "'.csv'" in message
    assert ".jsonl" in message and ".parquet" in message


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet"])
def test_missing_file(tmp_path, name):
    assert f"file not found: '{tmp_path / name}'" in _error(DataConfig(path=str(tmp_path / name)))


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    assert "not a readable parquet file" in _error(DataConfig(path=str(path)))


def test_missing_key_lists_keys_and_suggests(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "ok"}, {"prompts": "typo", "label": "1"}])
    message = _error(DataConfig(path=str(path)))
    assert message == f"{path}:2: missing key 'prompt' (did you mean 'prompts'?) (keys present: prompts, label)"


def test_missing_custom_key_without_close_match(tmp_path):
    path = _jsonl(tmp_path, [{"a": 1, "b": 2}])
    message = _error(DataConfig(path=str(path), input_key="question"))
    assert message == f"{path}:1: missing key 'question' (keys present: a, b)"


def test_prompt_of_wrong_type(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "fine"}, {"prompt": 3}])
    message = _error(DataConfig(path=str(path)))
    assert message == f"{path}:2: key 'prompt' must be text or a list of {{role, content}} messages, got int"


@pytest.mark.parametrize(
    ("prompt", "problem"),
    [
        (None, "got null"),
        ({"role": "user", "content": "hi"}, "got dict"),
        ([], "got an empty list"),
        (["hi"], "but message 0 is str, not a dict"),
        ([{"role": "user"}], "but message 0 has no 'content'"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], "but message 1 has no 'role'"),
        ([{"role": "user", "content": 5}], "but message 0 has 'content' of type int, expected text"),
    ],
)
def test_bad_chat_messages(tmp_path, prompt, problem):
    path = _jsonl(tmp_path, [{"q": prompt}])
    message = _error(DataConfig(path=str(path), input_key="q"))
    assert message.startswith(f"{path}:1: key 'q' must be text or a list of {{role, content}} messages")
    assert message.endswith(problem)


def test_metadata_must_be_a_dict(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "hi", "meta": ["x"]}])
    message = _error(DataConfig(path=str(path), metadata_key="meta"))
    assert message == f"{path}:1: key 'meta' must be an object (dict), got list"


def test_record_must_be_an_object(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "hi"}, ["prompt", "hi"]])
    assert _error(DataConfig(path=str(path))) == f"{path}:2: expected an object with key 'prompt', got list"


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": \n')
    assert _error(DataConfig(path=str(path))).startswith(f"{path}:3: malformed JSON")


def test_parquet_errors_name_the_row(tmp_path):
    path = _parquet(tmp_path, [{"prompt": "a", "n": 1}, {"prompt": None, "n": 2}])
    message = _error(DataConfig(path=str(path)))
    assert message.startswith(f"{path}:row 1: key 'prompt' must be text")
    assert message.endswith("got null")


def test_parquet_missing_column(tmp_path):
    path = _parquet(tmp_path, [{"text": "a", "label": "1"}])
    assert _error(DataConfig(path=str(path))) == f"{path}:row 0: missing key 'prompt' (keys present: text, label)"


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    message = _error(DataConfig(path=str(path)))
    assert f"'{path}' has no prompts" in message
