"""`Sample` JSONL round trips: every field survives (routed-expert arrays bit for bit, the
status enum, dict rewards, chat prompts); bad lines and unknown fields name file:line; writes
are atomic."""

from __future__ import annotations

import base64
import dataclasses
import json
import re

import numpy as np
import pytest

from miles_core.errors import MilesError
from miles_core.sample import Sample, Status, read_samples_jsonl, write_samples_jsonl


def full_sample() -> Sample:
    """A sample with every field set away from its default."""
    experts = np.random.default_rng(0).integers(-2**31, 2**31 - 1, size=(5, 2, 4), dtype=np.int32)
    return Sample(
        index=3, group_index=1,
        prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3? ünï 世界"}],
        tokens=[5, 6, 7, 8, 9, 10], response="5", response_length=2, label={"answer": "5", "tol": 0.5},
        reward={"score": 1.0, "format": 0.25}, loss_mask=[1, 0], status=Status.TRUNCATED,
        metadata={"finish_reason": {"type": "length", "length": 2}, "tags": ["a", "b"]},
        rollout_log_probs=[-0.1234567890123, -2.5e-8], rollout_routed_experts=experts,
        weight_versions=["3", "4"], spec_info={"accepted": 2, "proposed": 3},
    )


def assert_same_sample(actual: Sample, expected: Sample) -> None:
    for f in dataclasses.fields(Sample):
        a, e = getattr(actual, f.name), getattr(expected, f.name)
        if isinstance(e, np.ndarray):
            assert a.dtype == np.int32 and a.shape == e.shape and a.tobytes() == e.tobytes(), f.name
        else:
            assert a == e and type(a) is type(e), f.name


def test_round_trip_preserves_every_field(tmp_path):
    samples = [full_sample(), Sample(index=4, prompt="plain text", tokens=[1, 2], reward=0.5)]
    path = tmp_path / "out" / "samples.jsonl"
    assert write_samples_jsonl(samples, path) == 2
    back = list(read_samples_jsonl(path))
    assert len(back) == 2
    assert_same_sample(back[0], samples[0])
    assert_same_sample(back[1], samples[1])
    assert back[0].status is Status.TRUNCATED
    assert back[1].status is Status.PENDING and back[1].rollout_routed_experts is None
    assert back[1].loss_mask is None and back[1].rollout_log_probs is None


def test_routed_experts_are_stored_as_base64_int32_with_shape(tmp_path):
    path = tmp_path / "s.jsonl"
    sample = full_sample()
    write_samples_jsonl([sample], path)
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["status"] == "truncated"
    encoded = record["rollout_routed_experts"]
    assert (encoded["dtype"], encoded["shape"]) == ("int32", [5, 2, 4])
    assert len(encoded["base64"]) == 216  # 5 * 2 * 4 values * 4 bytes = 160 bytes; 4 * ceil(160 / 3)
    assert base64.b64decode(encoded["base64"]) == sample.rollout_routed_experts.tobytes()


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    write_samples_jsonl([Sample(index=0), Sample(index=1)], path)
    with path.open("a", encoding="utf-8") as handle:
        handle.write("\n{\"index\": 2,\n")  # a blank line 3 (skipped), then broken JSON on line 4
    reader = read_samples_jsonl(path)
    assert [next(reader).index, next(reader).index] == [0, 1]
    with pytest.raises(MilesError, match=rf"^{re.escape(str(path))}:4: malformed JSON"):
        next(reader)


def test_unknown_field_names_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    lines = [json.dumps(Sample(index=0).to_dict()), json.dumps({"index": 1, "rewards": 1.0, "prompt": "x"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(MilesError) as err:
        list(read_samples_jsonl(path))
    fields = sorted(f.name for f in dataclasses.fields(Sample))
    assert str(err.value) == (f"{path}:2: not a Sample record: unknown Sample field(s) ['rewards']; "
                              f"expected a subset of {fields}")


def test_bad_status_names_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"index": 0, "status": "done"}) + "\n", encoding="utf-8")
    expected = rf"^{re.escape(str(path))}:1: not a Sample record: 'done' is not a valid Status"
    with pytest.raises(MilesError, match=expected):
        list(read_samples_jsonl(path))


def test_failed_write_leaves_no_file_and_no_temp_file(tmp_path):
    def samples_then_crash():
        yield Sample(index=0)
        raise RuntimeError("reward server died")

    path = tmp_path / "new.jsonl"
    with pytest.raises(RuntimeError, match="reward server died"):
        write_samples_jsonl(samples_then_crash(), path)
    assert list(tmp_path.iterdir()) == []

    # An existing file keeps its old content.
    write_samples_jsonl([Sample(index=7)], path)
    with pytest.raises(RuntimeError, match="reward server died"):
        write_samples_jsonl(samples_then_crash(), path)
    assert list(tmp_path.iterdir()) == [path]
    assert [s.index for s in read_samples_jsonl(path)] == [7]
