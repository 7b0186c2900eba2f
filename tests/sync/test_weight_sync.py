"""The weight-sync seam: buckets partition the named tensors in order within the byte budget; the
in-process transport pauses the engine, hands every bucket over, flushes and resumes (also when a
bucket is refused), and leaves the engine's weights bitwise equal to the trainer's."""

from __future__ import annotations

import copy

import pytest
import torch

from miles_core.config import EngineConfig, ModelConfig, SyncConfig
from miles_core.checkpoint.loading import load_model
from miles_core.engine import build_engine
from miles_core.errors import MilesError
from miles_core.sync import SYNC_TRANSPORTS, build_weight_sync, buckets
from miles_core.sync.protocol import send_paused


def _named(*sizes: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate(sizes)]  # 4 bytes each


def test_buckets_keep_order_and_budget():
    # 40-byte budget: t0 (8 B) + t1 (24 B) = 32; t2 (16 B) would make 48: new bucket; t3 (80 B) is over
    # the budget and goes alone, never split or dropped; t4 (4 B) cannot join it
    groups = list(buckets(_named(2, 6, 4, 20, 1), bucket_bytes=40))
    assert [[name for name, _ in g] for g in groups] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]


class _Calls:
    """An engine that records pause and resume, and a `send` that records each bucket."""

    def __init__(self) -> None:
        self.calls: list = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def send(self, bucket, last, alone) -> None:
        self.calls.append(([name for name, _ in bucket], last, alone))


def test_a_push_of_one_bucket_is_one_call_alone_and_more_are_paused_around():
    one = _Calls()
    assert send_paused(one, _named(2, 3), 40, one.send) == (2, 1, 20)
    assert one.calls == [(["t0", "t1"], True, True)]  # no pause or resume round trips
    several = _Calls()
    assert send_paused(several, _named(2, 6, 4), 40, several.send) == (3, 2, 48)
    assert several.calls == ["pause", (["t0", "t1"], False, False), (["t2"], True, False), "resume"]
    empty = _Calls()
    assert send_paused(empty, [], 40, empty.send) == (0, 0, 0) and empty.calls == []


def test_a_failing_bucket_still_resumes_the_paused_engine():
    engine = _Calls()

    def refuse_second(bucket, last, alone):
        engine.send(bucket, last, alone)
        if last:
            raise MilesError("refused")

    with pytest.raises(MilesError, match="refused"):
        send_paused(engine, _named(8, 8), 40, refuse_second)
    assert engine.calls[0] == "pause" and engine.calls[-1] == "resume"


def test_one_bucket_when_everything_fits():
    assert [[n for n, _ in g] for g in buckets(_named(1, 2, 3), bucket_bytes=1 << 20)] == [["t0", "t1", "t2"]]
    assert list(buckets([], bucket_bytes=8)) == []


class RecordingEngine:
    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail_on = fail_on

    def pause(self) -> None:
        self.calls.append(("pause",))

    def resume(self) -> None:
        self.calls.append(("resume",))

    def flush_cache(self) -> None:
        self.calls.append(("flush",))

    def update_weights(self, named, version: str) -> None:
        names = [n for n, _ in named]
        if self.fail_on in names:
            raise MilesError(f"update_weights: unknown parameter '{self.fail_on}'")
        self.calls.append(("update", tuple(names), version))


def test_inprocess_sequence_and_stats(monkeypatch):
    engine = RecordingEngine()
    sync = build_weight_sync(SyncConfig(bucket_mb=1), engine)
    big = torch.zeros(1 << 18)  # exactly 1 MiB: fills a bucket
    stats = sync.push([("a", big), ("b", torch.zeros(3)), ("c", big)], version="7")
    assert engine.calls == [("pause",), ("update", ("a",), "7"), ("update", ("b",), "7"), ("update", ("c",), "7"),
                            ("flush",), ("resume",)]
    assert (stats.num_tensors, stats.num_buckets, stats.num_bytes) == (3, 3, 2 * (1 << 20) + 12)


def test_inprocess_resumes_the_engine_when_a_bucket_is_refused():
    engine = RecordingEngine(fail_on="t1")
    with pytest.raises(MilesError, match="unknown parameter 't1'"):
        build_weight_sync(SyncConfig(), engine).push(_named(1, 1), version="2")
    assert engine.calls == [("pause",), ("resume",)]


def test_unknown_transport_is_refused():
    cfg = SyncConfig()
    object.__setattr__(cfg, "transport", "rdma")  # the recipe schema lists only shipped transports
    expected = "unknown sync.transport 'rdma'; expected one of: cuda_ipc, disk, inprocess, nccl"
    with pytest.raises(MilesError, match=expected):
        build_weight_sync(cfg, RecordingEngine())
    assert set(SYNC_TRANSPORTS) == {"disk", "inprocess", "nccl", "cuda_ipc"}


@pytest.mark.parametrize("transport", ["nccl", "cuda_ipc"])
def test_server_transports_need_an_engine_in_other_processes(transport):
    with pytest.raises(MilesError, match=f"sync.transport = '{transport}' sends weights to servers in other "
                                         "processes; RecordingEngine is not one"):
        build_weight_sync(SyncConfig(transport=transport), RecordingEngine())


@pytest.mark.parametrize("address", ["http://host", "host:1234", " host", "a b"])
def test_nccl_master_address_must_be_a_bare_host(address):
    with pytest.raises(ValueError, match="nccl_master_address must be a host name or IP address"):
        SyncConfig(nccl_master_address=address)
    SyncConfig(nccl_master_address="fd00::1")  # IPv6 has colons, no port


def test_native_engine_holds_the_trainer_weights_bitwise_after_a_push(tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path))
    loaded = load_model(ModelConfig(source="tiny-qwen3", device="cpu"))
    engine = build_engine(EngineConfig(), loaded)
    trained = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    build_weight_sync(SyncConfig(bucket_mb=1), engine).push(trained.named_parameters(), version="3")
    assert engine.weight_version == "3" and engine.health()
    for (name, a), (_, b) in zip(loaded.model.named_parameters(), trained.named_parameters()):
        assert torch.equal(a, b), name


def test_a_kept_tuple_pushed_again_hands_the_engine_the_same_buckets(tmp_path, monkeypatch):
    from miles_core.models.kept_weights import WeightExport

    monkeypatch.setenv("MILES_CACHE", str(tmp_path))
    loaded = load_model(ModelConfig(source="tiny-qwen3", device="cpu"))
    engine = build_engine(EngineConfig(), loaded)
    trained = copy.deepcopy(loaded.model)
    export = WeightExport(trained)
    handed, original = [], engine.update_weights
    monkeypatch.setattr(engine, "update_weights",
                        lambda named, version, **waits: (handed.append(named), original(named, version, **waits)))
    sync = build_weight_sync(SyncConfig(bucket_mb=1), engine)
    for step in (1, 2):
        with torch.no_grad():
            for p in trained.parameters():
                p.add_(torch.randn_like(p))  # the optimizer's step, in place: the same tuple is handed out
        stats = sync.push(export.current(), version=str(step))
        assert engine.weight_version == str(step) and stats.num_tensors == len(export.current())
        for name, tensor in export.current():
            assert torch.equal(engine.get_weights_by_name(name), tensor), name
    first, second = handed[:stats.num_buckets], handed[stats.num_buckets:]
    assert len(first) == len(second) and all(a is b for a, b in zip(first, second))  # known again by identity
    trained.model.norm.weight.data = trained.model.norm.weight.data + 1  # moved: a new tuple, bucketed afresh
    sync.push(export.current(), version="3")
    assert all(a is not b for a, b in zip(first, handed[-stats.num_buckets:]))
    assert torch.equal(engine.get_weights_by_name("model.norm.weight"), trained.model.norm.weight)


def test_weights_from_a_generator_are_sent_a_bucket_at_a_time():
    engine = RecordingEngine()
    made = []

    def gathered():  # FSDP's full tensors, made one by one: never all held at once
        for name in ("a", "b", "c"):
            made.append(name)
            yield name, torch.zeros(1 << 18)  # 1 MiB: a bucket each

    sync = build_weight_sync(SyncConfig(bucket_mb=1), engine)
    original = engine.update_weights
    seen = []
    engine.update_weights = lambda named, version: (seen.append(list(made)), original(named, version))
    sync.push(gathered(), version="1")
    assert seen == [["a", "b"], ["a", "b", "c"], ["a", "b", "c"]]  # the first sent before "c" was made
