"""The local weight channel of `miles serve`: `/update_weights_from_tensor` over a Unix socket kept
open (CUDA IPC faked by the process's own memory, as in `test_serve_weight_routes`). Updates over
it are the route's (bitwise, versioned, a 409 for an unknown reference), no HTTP call is made per
update, bad tokens and bad or oversized messages (an unknown route, a malformed distributed
bucket) are refused with one line, a server that stops is a clear error, and a server that offers
no channel is reached over HTTP. Distributed buckets over it: `tests/sync/test_nccl_sync.py`."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat

import pytest

from miles_core.config import EngineConfig
from miles_core.engine import http_weights
from miles_core.engine.http import SGLangHttpEngine
from miles_core.engine.local_channel import (DISTRIBUTED_ROUTE, TENSOR_ROUTE, ChannelTimeout, WeightChannel,
                                             receive_frame, route_frame, route_of, send_frame)
from miles_core.errors import MilesError, Refused
from miles_core.serve import weight_routes
from miles_core.sync.cuda_ipc import IpcDescriptions, StorageExports
from miles_core.sync.ipc_format import reference
from tests.serve.conftest import start
from tests.serve.test_serve_weight_routes import FakeIpc, _assert_holds, _known_after_a_staged_push, _noisy


def _server_and_weights(monkeypatch, **options):
    """(state, thread, descriptions, weights): a server (not started) and weights whose storages
    the trainer knows (direct pushes)."""
    FakeIpc(monkeypatch)
    state, thread = start(allow_unauthenticated_weight_updates=True, **options)
    descriptions = IpcDescriptions(StorageExports(device_type="cpu"))
    weights = _noisy(state.engine, 1)
    _known_after_a_staged_push(descriptions, weights)
    return state, thread, descriptions, weights


def _client(url: str) -> SGLangHttpEngine:
    return SGLangHttpEngine(EngineConfig(backend="sglang", urls=[url], request_timeout_s=30), urls=[url])


@pytest.fixture
def channel_server(monkeypatch):
    """(state, url, engine, descriptions, weights, paths) of a server, a client engine recording
    the HTTP paths it posts, and weights whose storages the trainer knows (direct pushes)."""
    state, thread, descriptions, weights = _server_and_weights(monkeypatch, max_request_bytes=64 << 10)
    with thread as url:
        engine = _client(url)
        paths: list[str] = []
        post_one = engine._post_one
        monkeypatch.setattr(engine, "_post_one", lambda server, path, body: (paths.append(path),
                                                                             post_one(server, path, body))[1])
        try:
            yield state, url, engine, descriptions, weights, paths
        finally:
            engine.close()


def _push(engine, serialized: str, version: str) -> None:
    engine.update_weights_from_tensor([serialized], load_format="miles_cuda_ipc", version=version, flush=True,
                                      abort_all=True, local=True)


def test_updates_over_the_channel_are_the_routes_with_no_http_call(channel_server):
    state, _, engine, descriptions, weights, paths = channel_server
    text = descriptions.direct(weights)
    _push(engine, text, "1")
    for version in ("2", "3"):
        for _, tensor in weights:  # the trainer's step writes in place
            tensor.add_(0.5)
        _push(engine, reference(text), version)
        _assert_holds(state.engine, weights)
    assert state.engine.weight_version == engine.weight_version == "3"
    assert paths == ["/weight_channel"]  # asked once where it is; every update went over it
    assert not state.worker.paused
    with pytest.raises(Refused) as refused:  # a reference the server never saw: 409, the channel stays
        _push(engine, reference(text + " "), "4")
    assert refused.value.status == 409 and "is not known here" in str(refused.value)
    _push(engine, text, "4")
    assert state.engine.weight_version == "4" and paths == ["/weight_channel"]


def test_the_channel_lies_in_a_private_folder_and_needs_the_token(channel_server):
    state, url, engine, *_ = channel_server
    where = engine._post_one(engine.servers[0], "/weight_channel", {})
    assert stat.S_IMODE(os.stat(os.path.dirname(where["path"])).st_mode) == 0o700
    with pytest.raises(Refused, match="wrong token") as refused:
        WeightChannel(url, where["path"], "not-the-token", timeout_s=10)
    assert refused.value.status == 401
    with pytest.raises(MilesError, match="cannot connect|No such file"):
        WeightChannel(url, where["path"] + "-none", where["token"], timeout_s=10)


def _raw_channel(engine) -> socket.socket:
    where = engine._post_one(engine.servers[0], "/weight_channel", {})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(where["path"])
    send_frame(sock, json.dumps({"token": where["token"]}).encode())
    assert json.loads(receive_frame(sock, 1 << 20)) == {"success": True, "routes": [TENSOR_ROUTE, DISTRIBUTED_ROUTE]}
    return sock


def _ask(sock: socket.socket, payload: bytes) -> dict:
    send_frame(sock, payload)
    return json.loads(receive_frame(sock, 1 << 20))


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with the message's rest unread
        return True


def test_bad_messages_are_refused_with_one_line_and_nothing_changes(channel_server):
    state, _, engine, *_ = channel_server
    version = state.engine.weight_version
    with _raw_channel(engine) as sock:
        assert _ask(sock, b"{not json")["message"].startswith("malformed JSON")
        answer = _ask(sock, json.dumps({"serialized_named_tensors": "x"}).encode())
        assert answer == {"success": False, "message": "serialized_named_tensors: Input should be a valid list",
                          "code": 400}
        answer = _ask(sock, json.dumps({"serialized_named_tensors": [], "load_format": "pickle"}).encode())
        assert answer["code"] == 400 and "load_format 'pickle' is not supported" in answer["message"]
        answer = _ask(sock, route_frame("/update_weights_from_disk", {"model_path": "/"}))
        assert answer["code"] == 404 and "route '/update_weights_from_disk' is not taken" in answer["message"]
        bucket = {"names": ["a"], "dtypes": ["float32"], "shapes": [[2]], "group_name": "none"}
        answer = _ask(sock, route_frame(DISTRIBUTED_ROUTE, bucket))  # refused before any broadcast, as the route does
        assert answer["code"] == 400 and "no weight-update group 'none'" in answer["message"]
        answer = _ask(sock, route_frame(DISTRIBUTED_ROUTE, {**bucket, "dtypes": "float32"}))
        assert answer["code"] == 400 and answer["message"].startswith("dtypes: Input should be a valid list")
        answer = _ask(sock, b" " * (65 << 10))  # over --max-request-bytes: answered, then closed
        assert answer["code"] == 413 and "65536" in answer["message"]
        assert _closed(sock)
    assert state.engine.weight_version == version


def test_a_frame_names_its_route_unless_it_is_a_tensor_update():
    body = {"names": ["a\nb"], "weight_version": "1"}
    assert route_frame(TENSOR_ROUTE, body) == json.dumps(body).encode()  # what every server takes
    framed = route_frame(DISTRIBUTED_ROUTE, body)
    assert framed.startswith(b"/update_weights_from_distributed\n{")
    assert route_of(framed) == (DISTRIBUTED_ROUTE, json.dumps(body).encode())
    assert route_of(json.dumps(body).encode()) == (TENSOR_ROUTE, json.dumps(body).encode())


def test_answers_over_channels_time_out_as_a_futures_do():
    """What `update_weights_from_distributed` hands back over channels reads the answers on
    `result`; with a timeout there (a failed broadcast's brief look for the server's reason) it
    raises `TimeoutError` as a future does, so the broadcast's own error is reported."""
    from miles_core.engine.http_weights import _ChannelAnswers

    class _Channel:
        timeout_s = 60.0

    def stuck() -> list[dict]:
        raise ChannelTimeout("http://x: no answer over the local weight channel within 5 s")

    channel = _Channel()
    with pytest.raises(TimeoutError) as caught:
        _ChannelAnswers(stuck, [channel]).result(timeout=5)
    assert channel.timeout_s == 5 and not isinstance(caught.value, MilesError)
    with pytest.raises(ChannelTimeout, match="no answer over the local weight channel"):
        _ChannelAnswers(stuck, [channel]).result()
    reads = []
    answered = _ChannelAnswers(lambda: reads.append(1) or [{"success": True}], [channel])
    assert answered.result() == answered.result() == [{"success": True}] and reads == [1]  # read once


def test_a_stopped_server_is_a_clear_error(monkeypatch):
    state, thread, descriptions, weights = _server_and_weights(monkeypatch)
    with thread as url:
        engine = _client(url)
        _push(engine, descriptions.direct(weights), "1")
        folder = os.path.dirname(state.weight_channel.path)
        channel, connects = engine._channels[1][0], []
        connect = http_weights.accepts_connections
        monkeypatch.setattr(http_weights, "accepts_connections", lambda url: connects.append(url) or connect(url))
        assert channel.peer_open() and engine.listening(engine.servers[0]) and connects == []  # no TCP connect
    assert not os.path.exists(folder)  # the server removed its socket on the way out
    assert not channel.peer_open()
    assert not engine.listening(engine.servers[0]) and engine._channels is None  # ended: dropped; nothing listens
    assert connects == [url]
    engine._channels = ([engine.servers[0].url], [channel])  # as if still open: the push finds it broken
    with pytest.raises(MilesError, match="local weight channel failed"):
        _push(engine, descriptions.direct(weights), "2")
    assert engine._channels is None  # dropped: the next update asks again
    engine.close()


def test_a_server_without_a_channel_is_updated_over_http(channel_server, monkeypatch, caplog):
    state, _, engine, descriptions, weights, paths = channel_server

    def cannot(state):
        raise OSError("AF_UNIX path too long")

    monkeypatch.setattr(weight_routes, "WeightChannelServer", cannot)
    text = descriptions.direct(weights)
    with caplog.at_level(logging.WARNING):
        _push(engine, text, "1")
        _push(engine, reference(text), "2")
    assert paths == ["/weight_channel", "/update_weights_from_tensor", "/update_weights_from_tensor"]
    assert "no local weight channel" in caplog.text and "AF_UNIX path too long" in caplog.text
    assert state.engine.weight_version == "2"
    _assert_holds(state.engine, weights)
    assert engine.listening(engine.servers[0]) and engine._channels[1] == []  # a TCP connect; not asked again
    _push(engine, reference(text), "2b")
    assert paths.count("/weight_channel") == 1
