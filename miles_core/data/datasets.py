"""Prompt datasets: a `.jsonl` / `.parquet` file or a built-in task -> a list of `Sample`s.

Every record becomes one `Sample` with the prompt, label and metadata filled in and no tokens
yet (the prompt is rendered by `chat.render_prompt`, the response comes from the engine).
Records are checked as they are read, and a bad one is reported by where it is: `file:line` for
JSONL (1-based, as editors count) and `file:row N` for parquet (0-based, as pyarrow and pandas
index rows). Order is file order; shuffling belongs to the training loop, which owns the seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from miles_core.config import DataConfig
from miles_core.data.chat import prompt_problem, type_name
from miles_core.data.tasks import TASKS
from miles_core.errors import MilesError, did_you_mean, one_of
from miles_core.sample import Sample
from miles_core.utils.io import iter_jsonl

Located = Iterator[tuple[str, Any]]
"""("where", record) pairs; "where" prefixes every error about that record."""


@dataclass(frozen=True)
class _Keys:
    input: str
    label: str
    metadata: str


# Built-in tasks write records with these keys whatever the user's file keys are set to.
_TASK_KEYS = _Keys(input="prompt", label="label", metadata="metadata")


def load_prompts(cfg: DataConfig) -> list[Sample]:
    """The prompts of `cfg.path` or `cfg.task`, in order, the first `cfg.max_prompts` if > 0."""
    if cfg.path:
        source, records, keys = f"'{cfg.path}'", _read_file(Path(cfg.path)), _file_keys(cfg)
    elif not cfg.task:
        raise MilesError("no prompt source: set data.path (a .jsonl or .parquet file) or data.task "
                         f"(one of: {', '.join(sorted(TASKS))})")
    else:
        source, records, keys = f"task '{cfg.task}'", _generate(cfg), _TASK_KEYS
    # islice stops reading a large file once enough prompts are in.
    records = itertools.islice(records, cfg.max_prompts or None)
    samples = [_to_sample(i, where, record, keys) for i, (where, record) in enumerate(records)]
    if not samples:
        raise MilesError(f"{source} has no prompts; expected at least one record")
    return samples


def prompt_location(cfg: DataConfig, index: int) -> str:
    """Where prompt `index` of `load_prompts(cfg)` comes from (`file:line`), for error messages."""
    records = _read_file(Path(cfg.path)) if cfg.path else _generate(cfg)
    return next(itertools.islice(records, index, None))[0]


def _file_keys(cfg: DataConfig) -> _Keys:
    return _Keys(input=cfg.input_key, label=cfg.label_key, metadata=cfg.metadata_key)


def _read_file(path: Path) -> Located:
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        found = f"suffix '{suffix}'" if suffix else "no suffix"
        raise MilesError(
            f"unsupported prompt file '{path}' ({found}); "
            f"expected one of: {', '.join(sorted(_READERS))}"
        )
    return _READERS[suffix](path)


def _iter_parquet(path: Path) -> Located:
    if not path.is_file():
        raise MilesError(f"file not found: '{path}'")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise MilesError(f"'{path}': not a readable parquet file ({err})") from None
    row = 0
    # Batches keep memory bounded on large files.
    for batch in parquet.iter_batches():
        for record in batch.to_pylist():
            yield f"{path}:row {row}", record
            row += 1


_READERS = {".jsonl": iter_jsonl, ".parquet": _iter_parquet}


def _generate(cfg: DataConfig) -> Located:
    if cfg.task not in TASKS:
        raise one_of("task", cfg.task, TASKS)
    records = TASKS[cfg.task](getattr(cfg, cfg.task))
    return ((f"task '{cfg.task}' record {i}", record) for i, record in enumerate(records))


def _to_sample(index: int, where: str, record: Any, keys: _Keys) -> Sample:
    if not isinstance(record, dict):
        raise MilesError(f"{where}: expected an object with key '{keys.input}', got {type_name(record)}")
    return Sample(
        index=index,
        group_index=index,
        prompt=_prompt(where, record, keys.input),
        label=record.get(keys.label),
        metadata=_metadata(where, record, keys.metadata),
    )


def _prompt(where: str, record: dict[str, Any], key: str) -> Any:
    if key not in record:
        present = ", ".join(map(str, record)) or "none"
        raise MilesError(f"{where}: missing key '{key}'{did_you_mean(key, record)} (keys present: {present})")
    prompt = record[key]
    problem = prompt_problem(prompt)
    if problem:
        raise MilesError(
            f"{where}: key '{key}' must be text or a list of {{role, content}} messages, {problem}"
        )
    return prompt


def _metadata(where: str, record: dict[str, Any], key: str) -> dict[str, Any]:
    metadata = record.get(key)
    # An absent key and an explicit null (a parquet column with gaps) both mean "no metadata".
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise MilesError(f"{where}: key '{key}' must be an object (dict), got {type_name(metadata)}")
    return metadata
