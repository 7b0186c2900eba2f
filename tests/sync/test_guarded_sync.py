"""`sync.timeout_s` (an error instead of a hang) and `sync.check_weight_update_equal` (the engine's
weights read back bitwise after a sync) over the in-process and disk transports."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from miles_core.checkpoint.loading import load_model
from miles_core.config import EngineConfig, ModelConfig, SyncConfig
from miles_core.engine import build_engine
from miles_core.errors import MilesError
from miles_core.sync import SyncContext, build_weight_sync


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    loaded = load_model(ModelConfig(source="tiny-qwen3", device="cpu"))
    engine = build_engine(EngineConfig(), loaded)
    trained = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    context = SyncContext(loaded.hf_config, loaded.path, tmp_path / "sync")
    return engine, trained, context


@pytest.mark.parametrize("transport", ["inprocess", "disk"])
def test_check_passes_when_the_engine_took_every_tensor(setup, transport):
    engine, trained, context = setup
    sync = build_weight_sync(SyncConfig(transport=transport, check_weight_update_equal=True, bucket_mb=1),
                             engine, context)
    sync.push(trained.named_parameters(), version="2")
    assert engine.weight_version == "2"
    assert torch.equal(engine.get_weights_by_name("model.norm.weight"), trained.model.norm.weight)


@pytest.mark.parametrize("transport", ["inprocess", "disk"])
def test_check_catches_a_tensor_the_engine_did_not_take(setup, transport, monkeypatch):
    engine, trained, context = setup
    original = engine.update_weights

    def drops_one(named, version, **waits):  # a transport bug: one tensor never arrives
        original([(n, t) for n, t in named if n != "model.norm.weight"], version, **waits)

    monkeypatch.setattr(engine, "update_weights", drops_one)
    sync = build_weight_sync(SyncConfig(transport=transport, check_weight_update_equal=True), engine, context)
    with pytest.raises(MilesError, match=r"version 5: the engine's 'model.norm.weight' differs from the trainer's"):
        sync.push(trained.named_parameters(), version="5")
    # without the check the same push "succeeds" silently
    plain = build_weight_sync(SyncConfig(transport=transport), engine, context)
    plain.push(trained.named_parameters(), version="6")
    assert not torch.equal(engine.get_weights_by_name("model.norm.weight"), trained.model.norm.weight)


class _Unbounded:
    """An in-process engine whose waits take no bound: its pushes run under the deadline's thread."""

    bounded_waits = False

    def __init__(self, engine) -> None:
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def update_weights(self, named, version):
        self.engine.update_weights(named, version)


def test_a_stuck_engine_is_an_error_not_a_hang(setup, monkeypatch):
    engine, trained, context = setup
    engine = _Unbounded(engine)
    release = threading.Event()
    monkeypatch.setattr(engine, "update_weights", lambda named, version: release.wait())
    sync = build_weight_sync(SyncConfig(timeout_s=0.2), engine, context)
    try:
        with pytest.raises(MilesError, match=r"weight sync of version 7 did not finish within sync.timeout_s = 0.2 s"):
            sync.push(trained.named_parameters(), version="7")
        monkeypatch.undo()  # the engine recovers: the next push gets a fresh thread, not the stuck one's queue
        sync.push(trained.named_parameters(), version="8")
        assert engine.weight_version == "8"
    finally:
        release.set()


def test_a_native_engine_stuck_in_a_step_is_an_error_on_the_callers_thread(setup):
    engine, trained, context = setup
    sync = build_weight_sync(SyncConfig(timeout_s=0.2), engine, context)
    before = {name: tensor.clone() for name, tensor in engine.weights.tensors().items()}
    assert engine._step_lock.acquire()  # a step that does not end
    try:
        with pytest.raises(MilesError, match=r"update_weights: the engine's running step did not end within 0.2 s "
                                             r"\(sync.timeout_s\); the engine is stuck"):
            sync.push(trained.named_parameters(), version="7")
        assert engine.health()  # resumed after the failed push, and nothing was written
        assert all(torch.equal(before[name], tensor) for name, tensor in engine.weights.tensors().items())
        assert engine.weight_version != "7"
    finally:
        engine._step_lock.release()
    sync.push(trained.named_parameters(), version="8")
    assert engine.weight_version == "8"
    assert torch.equal(engine.get_weights_by_name("model.norm.weight"), trained.model.norm.weight)


def test_pushes_to_an_unbounded_engine_share_one_worker_thread(setup, monkeypatch):
    engine, trained, context = setup
    engine = _Unbounded(engine)
    threads, original = [], engine.update_weights

    def recorded(named, version):
        threads.append(threading.get_ident())
        original(named, version)

    monkeypatch.setattr(engine, "update_weights", recorded)
    sync = build_weight_sync(SyncConfig(timeout_s=30, bucket_mb=1), engine, context)
    for version in ("1", "2", "3"):
        sync.push(trained.named_parameters(), version=version)
    assert len(threads) >= 3 and len(set(threads)) == 1 and threads[0] != threading.get_ident()
    sync.close()


def test_pushes_to_a_native_engine_run_on_the_callers_thread(setup, monkeypatch):
    engine, trained, context = setup
    threads, original = [], engine.update_weights

    def recorded(named, version, timeout_s):
        threads.append((threading.get_ident(), timeout_s))
        original(named, version, timeout_s=timeout_s)

    monkeypatch.setattr(engine, "update_weights", recorded)
    sync = build_weight_sync(SyncConfig(timeout_s=30, bucket_mb=1), engine, context)
    sync.push(trained.named_parameters(), version="1")
    assert threads and set(threads) == {(threading.get_ident(), 30.0)}
    unlimited = build_weight_sync(SyncConfig(timeout_s=0, bucket_mb=1), engine, context)
    unlimited.push(trained.named_parameters(), version="2")
    assert threads[-1] == (threading.get_ident(), None) and engine.weight_version == "2"


def test_errors_of_the_transport_reach_the_caller_through_the_deadline(setup, monkeypatch):
    engine, trained, context = setup
    sync = build_weight_sync(SyncConfig(timeout_s=30), engine, context)
    with pytest.raises(MilesError, match="update_weights: unknown parameter 'nope'"):
        sync.push([("nope", torch.zeros(1))], version="1")


def test_bad_settings_are_refused(setup):
    engine, _, context = setup
    with pytest.raises(MilesError, match="check_weight_update_equal compares dense tensors"):
        build_weight_sync(SyncConfig(transport="disk", quantize="fp8", check_weight_update_equal=True), engine, context)
    with pytest.raises(ValueError, match="timeout_s must be >= 0"):
        SyncConfig(timeout_s=-1)


class _SplitTransport:
    """A transport with `push_within`: what it bounds itself runs on the caller's thread, the rest
    (here: versions starting with 's') through the deadline's `run`."""

    def __init__(self, stuck: threading.Event | None = None) -> None:
        self.threads: list[tuple[str, int]] = []
        self.stuck = stuck

    def push_within(self, weights, version, run):
        if not version.startswith("s"):
            self.threads.append((version, threading.get_ident()))
            return "inline"
        return run(lambda: self._slow(version))

    def _slow(self, version):
        self.threads.append((version, threading.get_ident()))
        if self.stuck is not None:
            self.stuck.wait()
        return "slow"


def test_a_transport_that_bounds_its_own_waits_runs_them_on_the_callers_thread():
    from miles_core.sync.guarded import TimedSync

    inner = _SplitTransport()
    sync = TimedSync(inner, timeout_s=30)
    assert (sync.push([], "1"), sync.push([], "s2"), sync.push([], "3")) == ("inline", "slow", "inline")
    here = threading.get_ident()
    assert [(v, t == here) for v, t in inner.threads] == [("1", True), ("s2", False), ("3", True)]
    stuck = threading.Event()
    sync = TimedSync(_SplitTransport(stuck), timeout_s=0.2)  # the part it hands over is still under the deadline
    try:
        with pytest.raises(MilesError, match=r"weight sync of version s9 did not finish within sync.timeout_s = 0.2 s"):
            sync.push([], "s9")
    finally:
        stuck.set()
