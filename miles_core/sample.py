"""`Sample`: the one record passed from rollout to training (and written as JSONL).

Token ids are produced once by the engine and never re-tokenised: `tokens` is prompt + response,
`response_length` counts the response tail, and the per-token lists (`loss_mask`,
`rollout_log_probs`) are aligned with that tail. Field names follow slime's `Sample` so that
rollout data moves between the tools. `rollout_routed_experts` is an int32 array of shape
`(len(tokens) - 1, num_moe_layers, topk)`, written to JSON as base64 like SGLang's
`routed_experts`, with its shape beside it.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from miles_core.errors import MilesError
from miles_core.utils.io import atomic_write, iter_jsonl


class Status(str, enum.Enum):
    """Lifecycle of a sample; the values are slime's spellings."""

    PENDING = "pending"
    COMPLETED = "completed"
    TRUNCATED = "truncated"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass(kw_only=True)
class Sample:
    """One prompt + one generated response, with everything training needs."""

    index: int = 0
    """Position of this sample in its rollout."""
    group_index: int = 0
    """Index of the prompt this sample answers; the `n` samples of a prompt share it."""
    prompt: str | list[dict[str, Any]] = ""
    """The prompt as given: text, or a chat message list."""
    tokens: list[int] = field(default_factory=list)
    """Prompt + response token ids."""
    response: str = ""
    """Decoded response text (stop string trimmed)."""
    response_length: int = 0
    """Number of response tokens at the end of `tokens`."""
    label: Any = None
    """Reference answer for the reward function."""
    reward: float | dict[str, Any] | None = None
    """Scalar reward, or a dict of named rewards."""
    loss_mask: list[int] | None = None
    """Per response token: 1 trains on it, 0 skips it (tool output, say). None means all 1."""
    status: Status = Status.PENDING
    metadata: dict[str, Any] = field(default_factory=dict)
    rollout_log_probs: list[float] | None = None
    """Per response token, the log-probability under the distribution actually sampled from."""
    rollout_routed_experts: np.ndarray | None = None
    """MoE routing of every token at every MoE layer: int32 (len(tokens) - 1, layers, topk)."""
    weight_versions: list[str] = field(default_factory=list)
    """Per response token, the weight version (optimizer steps, `rl/versions.py`) of the engine that
    sampled it; a partial rollout continued under newer weights has several. Tokens the engine did
    not sample (tool output) carry the version of the turn before them."""
    spec_info: dict[str, Any] = field(default_factory=dict)
    """Speculative decoding statistics (draft tokens proposed/accepted)."""

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    @property
    def response_tokens(self) -> list[int]:
        return self.tokens[self.prompt_length :]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["status"] = self.status.value
        out["rollout_routed_experts"] = _encode_array(self.rollout_routed_experts)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MilesError(f"unknown Sample field(s) {unknown}; expected a subset of {sorted(known)}")
        data = dict(data)
        if "status" in data:
            data["status"] = Status(data["status"])
        data["rollout_routed_experts"] = _decode_array(data.get("rollout_routed_experts"))
        return cls(**data)


def _encode_array(array: np.ndarray | None) -> dict[str, Any] | None:
    if array is None:
        return None
    array = np.ascontiguousarray(array, dtype=np.int32)
    return {
        "dtype": "int32",
        "shape": list(array.shape),
        "base64": base64.b64encode(array.tobytes()).decode("ascii"),
    }


def _decode_array(data: dict[str, Any] | None) -> np.ndarray | None:
    if data is None:
        return None
    flat = np.frombuffer(base64.b64decode(data["base64"]), dtype=np.dtype(data["dtype"]))
    return flat.reshape(data["shape"]).copy()


def write_samples_jsonl(samples: Iterable[Sample], path: str | Path) -> int:
    """Write samples to `path` atomically (temp file, then rename). Returns the count."""
    count = 0
    with atomic_write(path) as handle:
        for sample in samples:
            handle.write(json.dumps(sample.to_dict(), ensure_ascii=False) + "\n")
            count += 1
    return count


def read_samples_jsonl(path: str | Path) -> Iterator[Sample]:
    """Read samples written by `write_samples_jsonl`; a bad line is reported as file:line."""
    for where, record in iter_jsonl(path):
        try:
            yield Sample.from_dict(record)
        except (MilesError, TypeError, ValueError, KeyError) as err:
            raise MilesError(f"{where}: not a Sample record: {err}") from None
