"""`sync.transport = "nccl"` end to end over gloo: real `miles serve` subprocesses join the
weight-update group, receive every bucket by broadcast and end up bitwise equal to the trainer
(their `/weights_checksum` digests against the trainer's), with the version stamped, every
bucket's call over the servers' local weight channels (HTTP where a channel does not take it);
two servers take ranks 1 and 2; a refused bucket leaves the old weights and the group in step; a server that
is gone or stuck is a one-line error, not a hang."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from miles_core.checkpoint.loading import load_model
from miles_core.config import ModelConfig, SyncConfig
from miles_core.errors import MilesError
from miles_core.quant.formats import QuantSpec
from miles_core.sync import SyncContext, buckets, build_weight_sync
from miles_core.sync.guarded import CheckedSync
from miles_core.sync.group import tensor_sha256
from miles_core.sync.nccl import NcclSync
from miles_core.sync.quantized import quantized, round_tripped
from tests.sync.servers import ServeProcess, client_engine, digests, trained, version_of


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("disk_sync"))
    started = [ServeProcess(allowed_root=root), ServeProcess(allowed_root=root)]  # both load at once
    try:
        yield [s.wait_ready() for s in started]
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(source="tiny-qwen3", device="cpu"))


@pytest.fixture(scope="module")
def model(loaded):
    return loaded.model


def _innermost(sync):
    while hasattr(sync, "inner"):
        sync = sync.inner
    return sync


def _assert_holds(url: str, weights) -> None:
    held = digests(url, [n for n, _ in weights])
    assert {n: held[n]["sha256"] for n, _ in weights} == {n: tensor_sha256(t) for n, t in weights}


@pytest.mark.parametrize("flatten", [True, False], ids=["flattened_bucket", "per_tensor"])
def test_push_over_gloo_in_several_buckets_is_bitwise(servers, model, flatten):
    engine = client_engine(servers[0])
    sync = build_weight_sync(SyncConfig(transport="nccl", check_weight_update_equal=True, timeout_s=60,
                                        nccl_flatten=flatten), engine)
    inner = _innermost(sync)
    inner.bucket_bytes = 100_000  # 25 tensors, 460 KB in 5 buckets
    weights = trained(model, seed=1)
    before = digests(servers[0].url, [weights[0][0]])[weights[0][0]]["sha256"]
    assert before != tensor_sha256(weights[0][1])  # the check below can fail
    stats = sync.push(weights, version="7")
    assert (stats.num_tensors, stats.num_bytes, stats.num_buckets) == (25, 460288, 5)
    assert len(list(buckets(weights, 100_000))) == 5
    _assert_holds(servers[0].url, weights)
    assert version_of(servers[0].url) == "7" and engine.weight_version == "7"
    assert inner.group.world_size == 2 and inner.group.backend == "gloo"
    again = trained(model, seed=2)  # the same group carries the next push
    sync.push(again, version="8")
    _assert_holds(servers[0].url, again)
    assert (inner.staging is not None) == flatten
    answer = httpx.post(servers[0].url + "/update_weights_from_distributed", json={
        "names": ["a"], "dtypes": ["float32"], "shapes": [[2]], "group_name": inner.group.name, "load_format": "zip"})
    assert answer.status_code == 400 and "load_format 'zip' is not supported" in answer.json()["error"]["message"]
    sync.close()
    assert inner.group is None


def test_local_servers_get_their_buckets_over_the_weight_channel(servers, model):
    """Servers on this machine take every bucket's call over their local weight channels (no HTTP
    call per bucket), bitwise; where a channel takes tensor updates only (an older server), the
    buckets go over HTTP."""
    engine = client_engine(*servers)
    sync = NcclSync(engine, SyncConfig(transport="nccl", timeout_s=60))
    sync.bucket_bytes = 100_000  # 5 buckets: the servers are paused around them (over HTTP)
    paths = []
    post_one = engine._post_one
    engine._post_one = lambda server, path, body: (paths.append(path), post_one(server, path, body))[1]
    for version, seed in (("40", 20), ("41", 21)):
        weights = trained(model, seed=seed)
        sync.push(weights, version=version)
        for server in servers:
            _assert_holds(server.url, weights)
            assert version_of(server.url) == version
    assert "/update_weights_from_distributed" not in paths and paths.count("/weight_channel") == 2
    assert engine.weight_channels_open()
    for channel in engine._channels[1]:
        channel.routes = frozenset({"/update_weights_from_tensor"})
    weights = trained(model, seed=22)
    sync.push(weights, version="42")
    assert paths.count("/update_weights_from_distributed") == 2 * 5
    for server in servers:
        _assert_holds(server.url, weights)
    sync.close()


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_quantised_pushes_travel_quantised_and_a_dense_server_dequantises_them(servers, model, fmt):
    """sync.quantize over nccl sends what `miles quantize` writes (as slime sends FP8 to SGLang);
    a server holding dense weights ends up with the dense round trip's bits."""
    engine = client_engine(servers[1])
    sync = build_weight_sync(SyncConfig(transport="nccl", quantize=fmt, quantize_group_size=32, timeout_s=60), engine)
    _innermost(sync).bucket_bytes = 5_000  # many buckets: a weight's parts must stay in one
    weights = trained(model, seed=5)
    spec = QuantSpec(fmt, 32)
    sent = list(quantized(weights, spec))
    stats = sync.push(weights, version=f"q-{fmt}")
    assert stats.num_tensors == len(sent) and stats.num_buckets > 5
    assert stats.num_bytes == sum(t.numel() * t.element_size() for _, t in sent) < sum(
        t.numel() * t.element_size() for _, t in weights)
    _assert_holds(servers[1].url, list(round_tripped(weights, spec)))
    assert version_of(servers[1].url) == f"q-{fmt}"
    sync.close()


def test_disk_pushes_to_servers_are_checked_bitwise(servers, loaded):
    engine = client_engine(servers[0])
    cfg = SyncConfig(transport="disk", disk_dir=servers[0].allowed_root, check_weight_update_equal=True)
    sync = build_weight_sync(cfg, engine, SyncContext(loaded.hf_config, loaded.path, Path(servers[0].allowed_root)))
    weights = trained(loaded.model, seed=11)
    sync.push(weights, version="21")
    _assert_holds(servers[0].url, weights)


class _DropsFirst:
    """A transport bug: the first tensor never reaches the servers."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def push(self, weights, version):
        return self.inner.push(list(weights)[1:], version)


def test_the_check_catches_a_tensor_a_server_did_not_get(servers, model):
    engine = client_engine(servers[0])
    nccl = NcclSync(engine, SyncConfig(transport="nccl"))
    nccl.push(trained(model, seed=12), version="30")
    checked = CheckedSync(_DropsFirst(nccl), engine)
    weights = trained(model, seed=13)
    with pytest.raises(MilesError, match=f"{servers[0].url} holds a '{weights[0][0]}' that differs from the trainer"):
        checked.push(weights, version="31")
    CheckedSync(nccl, engine).push(weights, version="32")  # the full push passes the same check
    nccl.close()


def test_two_servers_take_ranks_one_and_two(servers, model):
    engine = client_engine(*servers)
    sync = NcclSync(engine, SyncConfig(transport="nccl"))
    sent = []
    original = engine._post_all

    def recording(path, bodies):
        sent.append((path, bodies))
        return original(path, bodies)

    engine._post_all = recording
    weights = trained(model, seed=3)
    sync.push(weights, version="9")
    init = next(bodies for path, bodies in sent if path == "/init_weights_update_group")
    assert [(b["rank_offset"], b["world_size"], b["backend"]) for b in init] == [(1, 3, "gloo"), (2, 3, "gloo")]
    for server in servers:
        _assert_holds(server.url, weights)
        assert version_of(server.url) == "9"
    sync.close()


@pytest.mark.parametrize("bad", ["name", "shape"])
def test_a_refused_bucket_writes_nothing_and_the_group_stays_in_step(servers, model, bad):
    engine = client_engine(servers[0])
    sync = NcclSync(engine, SyncConfig(transport="nccl"))
    good = trained(model, seed=4)
    sync.push(good, version="10")
    name, tensor = good[0]
    wrong = ("model.layers.99.mlp.up_proj.weight", tensor) if bad == "name" else (name, tensor[:-1])
    expected = "unknown parameter 'model.layers.99" if bad == "name" else f"'{name}' has shape"
    newer = trained(model, seed=5)
    with pytest.raises(MilesError, match=f"refused: update_weights: {expected}.*the old weights are kept"):
        sync.push([wrong, *newer[1:]], version="11")  # one bucket: nothing of it may land
    _assert_holds(servers[0].url, good)
    assert version_of(servers[0].url) == "10"
    sync.push(newer, version="12")  # every broadcast of the refused bucket was received
    _assert_holds(servers[0].url, newer)
    sync.close()


def test_a_server_that_is_gone_fails_the_push_with_one_line(model):
    started = [ServeProcess(), ServeProcess()]
    try:
        engine = client_engine(*(s.wait_ready() for s in started), request_timeout_s=10)
        sync = build_weight_sync(SyncConfig(transport="nccl", timeout_s=30), engine)
        sync.push(trained(model, seed=6), version="1")
        started[1].process.kill()
        started[1].process.wait()
        gone = f"server {started[1].url} has left; the weight-update group needs"
        with pytest.raises(MilesError, match=gone) as caught:
            sync.push(trained(model, seed=7), version="2")
        assert "\n" not in str(caught.value)
    finally:
        for server in started:
            server.stop()


def test_a_stuck_server_fails_at_the_timeout_instead_of_hanging(model):
    server = ServeProcess().wait_ready()
    try:
        engine = client_engine(server, request_timeout_s=60)
        sync = build_weight_sync(SyncConfig(transport="nccl", timeout_s=3), engine)
        sync.push(trained(model, seed=8), version="1")
        server.process.send_signal(signal.SIGSTOP)
        with pytest.raises(MilesError, match="weight sync of version 2 did not finish within sync.timeout_s = 3 s"):
            sync.push(trained(model, seed=9), version="2")
    finally:
        server.stop()


def test_routes_refuse_malformed_buckets_before_any_broadcast(servers):
    url = servers[0].url
    base = {"names": ["a"], "dtypes": ["float32"], "shapes": [[2]], "group_name": "none"}
    answer = httpx.post(url + "/update_weights_from_distributed", json=base)
    assert answer.status_code == 400 and "no weight-update group 'none'" in answer.json()["error"]["message"]
    answer = httpx.post(url + "/init_weights_update_group", json={
        "master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2, "backend": "nccl"})
    assert answer.status_code == 400 and "backend 'nccl' needs the engine on CUDA" in answer.json()["error"]["message"]
    answer = httpx.post(url + "/weights_checksum", json={"names": ["nope"]})
    assert answer.status_code == 400 and "unknown parameter 'nope'" in answer.json()["error"]["message"]
