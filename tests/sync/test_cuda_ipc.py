"""`sync.transport = "cuda_ipc"`: the JSON description of shared storages (layout, encoding, every
check the server makes before it maps anything) and which weights may go direct, on CPU; real
pushes to a `miles serve` subprocess on the same GPU, staged and direct (GPU tests)."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from miles_core.errors import MilesError
from miles_core.sync.cuda_ipc import CudaIpcSync, IpcDescriptions, StorageExports
from miles_core.sync.ipc_format import IpcTensor, describe, digest, layout, parse_description, reference, referenced

FIELDS = {"device_index": 0, "handle": b"\x01handle\xff", "storage_size_bytes": 4096, "storage_offset_bytes": 512,
          "ref_counter_handle": b"ref", "ref_counter_offset": 3, "event_handle": b"\x00ev",
          "event_sync_required": True, "buffer_offset": 0, "buffer_bytes": 1024}
OTHER = {**FIELDS, "handle": b"other", "buffer_bytes": 64}


def test_layout_aligns_every_tensor_to_256_bytes():
    # f32 (3,) = 12 B at 0; bf16 (2, 2) = 8 B at 256; f32 (100,) = 400 B at 512; ends at 912
    offsets, size = layout([((3,), torch.float32), ((2, 2), torch.bfloat16), ((100,), torch.float32)])
    assert (offsets, size) == ([0, 256, 512], 912)


def _tensors():
    return [IpcTensor("a.weight", torch.float32, (3,), 0), IpcTensor("b.weight", torch.bfloat16, (2, 2), 256),
            IpcTensor("c.weight", torch.bfloat16, (5,), 2, storage=1)]


def test_description_round_trips_through_json():
    text = describe([FIELDS, OTHER], "GPU-1234", _tensors())
    raw = json.loads(text)
    assert raw["storages"][0]["handle"] == base64.b64encode(b"\x01handle\xff").decode()
    assert raw["tensors"][1]["dtype"] == "bfloat16" and raw["tensors"][2]["storage"] == 1
    parsed = parse_description(text)
    assert parsed.device_uuid == "GPU-1234" and parsed.storages == (FIELDS, OTHER)
    assert list(parsed.tensors) == _tensors() and [t.nbytes for t in parsed.tensors] == [12, 8, 10]


def _edited(**changes) -> str:
    raw = json.loads(describe([FIELDS, OTHER], "GPU-1234", _tensors()))
    raw.update(changes)
    return json.dumps(raw)


def _storage_edit(**changes) -> str:
    raw = json.loads(describe([FIELDS, OTHER], "GPU-1234", _tensors()))
    raw["storages"][1].update(changes)
    return json.dumps(raw)


def _tensor_edit(**changes) -> str:
    raw = json.loads(describe([FIELDS, OTHER], "GPU-1234", _tensors()))
    raw["tensors"][1].update(changes)
    return json.dumps(raw)


@pytest.mark.parametrize("text, message", [
    ("not json", "the description is not JSON"),
    (json.dumps({"format": "pickle"}), "expected a JSON object with format 'miles_cuda_ipc'"),
    (_edited(device_uuid=""), "device_uuid must be a non-empty string"),
    (_edited(storages=[]), "storages must be a non-empty list"),
    (_edited(storages=[7]), "storage 0: expected a JSON object of handle fields"),
    (_storage_edit(storage_size_bytes=-1), r"storage 1: storage_size_bytes must be an integer >= 0, got -1"),
    (_storage_edit(ref_counter_offset=True), r"storage 1: ref_counter_offset must be an integer >= 0, got True"),
    (_storage_edit(handle="%%%"), "storage 1: handle must be base64"),
    (_storage_edit(event_sync_required=1), "storage 1: event_sync_required must be true or false"),
    (_storage_edit(buffer_offset=4090), r"storage 1: range \[4090, \+64\) lies outside its storage of 4096 bytes"),
    (_edited(tensors=[]), "tensors must be a non-empty list"),
    (_tensor_edit(name="a.weight"), "tensor 'a.weight' is listed twice"),
    (_tensor_edit(dtype="complex64"), "unknown dtype 'complex64'"),
    (_tensor_edit(shape=[2, -2]), r"tensor 'b.weight' has shape \[2, -2\]"),
    (_tensor_edit(storage=2), "tensor 'b.weight' names storage 2; the description has 2"),
    (_tensor_edit(offset=257), "tensor 'b.weight' at byte 257 \\(\\+8\\) is not 2-byte aligned"),
    (_tensor_edit(shape=[600]), r"tensor 'b.weight' at byte 256 \(\+1200\) is not 2-byte aligned inside the 1024 "
                                r"shared bytes of storage 0"),
])
def test_every_bad_field_is_refused_by_name(text, message):
    with pytest.raises(MilesError, match=message):
        parse_description(text)


def test_a_reference_names_its_description_by_sha256():
    text = describe([FIELDS], "GPU-1234", _tensors()[:2])
    assert referenced(reference(text)) == digest(text) and len(digest(text)) == 64
    assert referenced(text) is None  # a whole description
    with pytest.raises(MilesError, match="same_as must be a description's sha256 \\(64 hex digits\\), got 'abc'"):
        referenced(json.dumps({"format": "miles_cuda_ipc", "same_as": "abc"}))


def test_a_storage_is_known_while_it_is_the_same_and_only_then():
    exports = StorageExports(device_type="cpu")
    weight, other = torch.ones(8), torch.zeros(8)
    assert not exports.knows(weight)  # never seen: the first push is staged
    noted: dict = {}
    exports.note(weight, noted)
    exports.remember(noted)
    assert exports.knows(weight) and exports.knows(weight.detach()) and not exports.knows(other)
    assert not exports.knows(torch.ones(4, 4).t())  # not contiguous: staged
    del weight
    fresh = torch.ones(8)  # may lie at the same address: a new storage all the same
    assert not exports.knows(fresh)


def test_a_kept_tuple_of_known_weights_is_taken_once():
    from miles_core.models.kept_weights import KeptWeights

    sync = object.__new__(CudaIpcSync)  # its trainer-side bookkeeping only (no GPU, no server)
    sync.descriptions, sync._last_taken = IpcDescriptions(StorageExports(device_type="cpu")), None
    kept = KeptWeights([("a", torch.ones(8)), ("b", torch.zeros(4))])
    assert sync._take(kept)[2] is not None and sync._last_taken is None  # unknown storages: staged
    noted: dict = {}
    for _, tensor in kept:
        sync.descriptions.exports.note(tensor, noted)
    sync.descriptions.exports.remember(noted)
    known, layout, rest = sync._take(kept)
    assert rest is None and [name for name, _ in known] == ["a", "b"]
    assert sync._take(kept)[:2] == (known, layout) and sync._take(kept)[0] is known  # no weight looked at again
    listed = list(kept)  # not a kept tuple: its weights are looked at (their layout)
    assert sync._take(listed)[0] is not known and sync._take(listed)[0] == known
    assert sync._last_taken[0] is None and sync._take(kept)[0] is not known  # the kept tuple is looked at again


def _ipc_bookkeeping(weights: list) -> CudaIpcSync:
    """A `CudaIpcSync`'s trainer-side bookkeeping (no GPU, no server) that knows `weights`'
    storages, as after a staged push of them."""
    sync = object.__new__(CudaIpcSync)
    sync.descriptions, sync._last_taken = IpcDescriptions(StorageExports(device_type="cpu")), None
    noted: dict = {}
    for _, tensor in weights:
        sync.descriptions.exports.note(tensor, noted)
    sync.descriptions.exports.remember(noted)
    return sync


def _names(taken) -> list[str]:
    known, _, rest = taken
    return [name for name, _ in known] + [name for name, _ in (rest or ())]


def test_weights_laid_out_as_the_last_direct_pushs_are_taken_by_their_layout():
    """An iterator of views of the held weights (FSDP on one rank, Megatron's renamed views) is
    taken by comparing names, addresses, dtypes and shapes; any difference falls back to the
    storage checks, and no weight is lost on the way."""
    a, b, c = torch.ones(4, 4), torch.zeros(8), torch.full((2,), 3.0)
    sync = _ipc_bookkeeping([("a", a), ("b", b), ("c", c)])
    known, layout, rest = sync._take(iter([("a", a), ("b", b)]))  # the storage checks: held from now on
    assert rest is None and sync._last_taken[1] is known and sync._last_taken[2] is layout
    again = sync._take((name, tensor.detach()) for name, tensor in [("a", a), ("b", b)])
    assert again[1] is layout and again[2] is None and again[0][1][1] is not b  # the new views, the held layout
    assert torch.equal(again[0][1][1], b) and sync._last_taken[1] is again[0]

    moved = sync._take(iter([("a", a), ("b", b.clone())]))  # a weight made afresh: staged from it
    assert _names(moved) == ["a", "b"] and moved[2] is not None and sync._last_taken is None
    sync._take(iter([("a", a), ("b", b)]))
    extra = sync._take(iter([("a", a), ("b", b), ("c", c), ("d", torch.ones(2))]))
    assert _names(extra) == ["a", "b", "c", "d"] and [n for n, _ in extra[0]] == ["a", "b", "c"]
    sync._take(iter([("a", a), ("b", b)]))
    fewer = sync._take(iter([("a", a)]))  # a new layout, taken by the storage checks
    assert fewer[2] is None and fewer[1] == [("a", a.data_ptr(), a.dtype, a.shape)]
    assert sync._take(iter([("a", a.t())]))[2] is not None  # same address, dtype and shape; not contiguous
    renamed = sync._take(iter([("a", a)])) and sync._take(iter([("x", a)]))
    assert renamed[2] is None and renamed[1] == [("x", a.data_ptr(), a.dtype, a.shape)]


class _Event:
    """A server's copied event, done after `polls` queries (never, with None)."""

    def __init__(self, polls: int | None) -> None:
        self.polls, self.queries = polls, 0

    def query(self) -> bool:
        self.queries += 1
        return self.polls is not None and self.queries > self.polls


def test_the_trainer_waits_on_the_servers_copied_events_within_the_timeout():
    from miles_core.config import SyncConfig
    from miles_core.sync.cuda_ipc import CudaIpcSync

    sync = object.__new__(CudaIpcSync)  # its wait only (no GPU, no server)
    sync.cfg = SyncConfig(transport="cuda_ipc", timeout_s=0.2)
    events = {"a": _Event(3), "b": _Event(0), "stuck": _Event(None)}
    sync._copied_event = lambda handle, device: events[handle]
    sync._wait_copied([{"copied_event": "a"}, {"copied_event": "b"}, {"success": True}], torch.device("cpu"))
    assert (events["a"].queries, events["b"].queries) == (4, 1)  # polled until each is done
    with pytest.raises(MilesError, match=r"cuda_ipc: a server's copies of the weights did not finish within "
                                         r"sync.timeout_s = 0.2 s"):
        sync._wait_copied([{"copied_event": "stuck"}], torch.device("cpu"))
    assert events["stuck"].queries > 1


def _checked_ipc_sync(server):
    """A `cuda_ipc` sync to `server`, checked bitwise after every push, staging 100 kB buckets:
    (engine, sync, the transport inside its guards)."""
    from miles_core.config import SyncConfig
    from miles_core.sync import build_weight_sync
    from tests.sync.servers import client_engine

    engine = client_engine(server)
    sync = build_weight_sync(SyncConfig(transport="cuda_ipc", check_weight_update_equal=True, timeout_s=120), engine)
    inner = sync.inner.inner
    inner.bucket_bytes = 100_000
    return engine, sync, inner


@pytest.mark.gpu
def test_cuda_ipc_push_to_a_served_engine_on_the_same_gpu_is_bitwise():
    from miles_core.checkpoint.loading import load_model
    from miles_core.config import ModelConfig
    from miles_core.sync.group import tensor_sha256
    from tests.sync.servers import ServeProcess, digests, trained, version_of

    model = load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model
    server = ServeProcess(device="cuda:0").wait_ready()
    try:
        _, sync, inner = _checked_ipc_sync(server)  # several buckets through one buffer
        weights = [(n, t.cuda()) for n, t in trained(model, seed=1)]
        stats = sync.push(weights, version="3")
        assert stats.num_buckets == 5 and version_of(server.url) == "3"
        pointer = inner.buffer.data_ptr()
        again = [(n, t.cuda()) for n, t in trained(model, seed=2)]
        sync.push(again, version="4")
        assert inner.buffer.data_ptr() == pointer  # the buffer is reused, not reallocated
        held = digests(server.url, [n for n, _ in again])
        for name, tensor in again:
            assert held[name]["sha256"] == tensor_sha256(tensor.to(getattr(torch, held[name]["dtype"])))
        assert version_of(server.url) == "4"
    finally:
        server.stop()


@pytest.mark.gpu
def test_pushes_of_the_trainers_own_weights_go_direct_in_one_call():
    """Weights that stay where they are (a trainer's parameters, written in place each step): the
    first push is staged, every later one names them where they lie, one call, bitwise."""
    from miles_core.checkpoint.loading import load_model
    from miles_core.config import ModelConfig
    from tests.sync.servers import ServeProcess, trained, version_of

    model = load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model
    server = ServeProcess(device="cuda:0").wait_ready()
    try:
        engine, sync, inner = _checked_ipc_sync(server)  # the staged push takes several buckets
        weights = [(n, t.cuda()) for n, t in trained(model, seed=1)]
        assert sync.push(weights, version="1").num_buckets > 1 and inner.num_direct == 0
        for step in (2, 3):
            with torch.no_grad():
                for _, tensor in weights:
                    tensor.add_(0.25 * step)  # the optimizer's step, in place
            stats = sync.push(weights, version=str(step))  # the check reads every weight back bitwise
            assert (stats.num_buckets, stats.num_tensors, inner.num_direct) == (1, len(weights), step - 1)
        assert version_of(server.url) == "3" and len(engine._channels[1]) == 1  # over the local channel
        engine.release_memory()  # the server forgets every mapping and description: answers 409, gets the text
        engine.resume_memory()
        assert sync.push(weights, version="3b").num_buckets == 1 and inner.num_direct == 3
        fresh = [(n, t.clone()) for n, t in weights]  # made afresh (FSDP's gathered weights): staged again
        assert sync.push(fresh, version="4").num_buckets > 1 and inner.num_direct == 3
    finally:
        server.stop()


@pytest.mark.gpu
def test_a_trainers_kept_tuple_goes_direct_without_a_look_at_its_weights():
    """The native trainer's export (`KeptWeights`, the same tuple while its parameters stay in
    place): staged once, then direct, the pushes after the first direct one reusing what it took;
    the server holds every step's weights bitwise."""
    from miles_core.checkpoint.loading import load_model
    from miles_core.config import ModelConfig, SyncConfig
    from miles_core.models.kept_weights import WeightExport
    from miles_core.sync import build_weight_sync
    from miles_core.sync.group import tensor_sha256
    from tests.sync.servers import ServeProcess, client_engine, digests, version_of

    model = load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model.cuda()
    server = ServeProcess(device="cuda:0").wait_ready()
    try:
        sync = build_weight_sync(SyncConfig(transport="cuda_ipc", timeout_s=120), client_engine(server))
        inner, export = sync.inner, WeightExport(model)
        for step in (1, 2, 3):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.125 * step)  # the optimizer's step, in place
            sync.push(export.current(), version=str(step))
            held = digests(server.url, [name for name, _ in export.current()])
            for name, tensor in export.current():
                assert held[name]["sha256"] == tensor_sha256(tensor.to(getattr(torch, held[name]["dtype"]))), name
        assert version_of(server.url) == "3" and inner.num_direct == 2 and inner._last_taken[0] is export.current()
    finally:
        server.stop()


@pytest.mark.gpu
def test_nccl_push_over_nccl_to_a_served_engine_on_another_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs the trainer and the server on different GPUs")
    from miles_core.checkpoint.loading import load_model
    from miles_core.config import ModelConfig, SyncConfig
    from miles_core.sync import build_weight_sync
    from tests.sync.servers import ServeProcess, client_engine, trained, version_of

    model = load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model
    server = ServeProcess(device="cuda:1").wait_ready()
    try:
        engine = client_engine(server)
        sync = build_weight_sync(SyncConfig(transport="nccl", check_weight_update_equal=True, timeout_s=120), engine)
        weights = [(n, t.to("cuda:0")) for n, t in trained(model, seed=3)]
        sync.push(weights, version="5")
        assert sync.inner.inner.group.backend == "nccl" and version_of(server.url) == "5"
        sync.close()
    finally:
        server.stop()


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["cuda_ipc", "nccl"])
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_quantised_pushes_from_the_gpu_hold_the_cpu_round_trips_bits(transport, fmt):
    """sync.quantize on the trainer's GPU sends what `miles quantize` writes on CPU: a dense server
    dequantises it to the bits of the CPU round trip (the scales divide alike on both devices)."""
    if transport == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs the trainer and the server on different GPUs")
    from miles_core.checkpoint.loading import load_model
    from miles_core.config import ModelConfig, SyncConfig
    from miles_core.quant.formats import QuantSpec
    from miles_core.sync import build_weight_sync
    from miles_core.sync.group import tensor_sha256
    from miles_core.sync.quantized import round_tripped
    from tests.sync.servers import ServeProcess, client_engine, digests, trained, version_of

    model = load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model
    server = ServeProcess(device="cuda:0" if transport == "cuda_ipc" else "cuda:1").wait_ready()
    try:
        sync = build_weight_sync(SyncConfig(transport=transport, quantize=fmt, quantize_group_size=32, timeout_s=120),
                                 client_engine(server))
        weights = trained(model, seed=6)
        sync.push([(n, t.to("cuda:0")) for n, t in weights], version=f"gpu-{fmt}")
        expected = list(round_tripped(weights, QuantSpec(fmt, 32)))
        held = digests(server.url, [n for n, _ in expected])
        assert {n: held[n]["sha256"] for n, _ in expected} == {n: tensor_sha256(t) for n, t in expected}
        assert version_of(server.url) == f"gpu-{fmt}"
        getattr(sync, "close", lambda: None)()
    finally:
        server.stop()
