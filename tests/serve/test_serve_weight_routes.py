"""The weight routes of `miles serve` that need no peer: they are protected like the other weight
routes, and `/update_weights_from_tensor` refuses unknown load formats and bad or unmappable CUDA
IPC descriptions with one line, keeping the old weights; CUDA IPC pushes (on CPU, with the mapping
faked by the process's own memory) map the trainer's buffer once across buckets and pushes, and
bitwise."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from miles_core.sync import cuda_ipc, ipc_mapping
from miles_core.sync.cuda_ipc import IpcDescriptions, StorageExports
from miles_core.sync.ipc_format import IpcTensor, describe, reference
from miles_core.sync.flat import FlatStaging
from miles_core.sync.protocol import buckets
from tests.serve.conftest import start

FIELDS = {"device_index": 0, "handle": b"h", "storage_size_bytes": 4096, "storage_offset_bytes": 0,
          "ref_counter_handle": b"r", "ref_counter_offset": 0, "event_handle": b"e", "event_sync_required": False,
          "buffer_offset": 0, "buffer_bytes": 4096}


@pytest.mark.parametrize("path", ["/init_weights_update_group", "/update_weights_from_distributed",
                                  "/destroy_weights_update_group", "/weight_channel"])
def test_distributed_routes_need_the_api_key(path):
    state, thread = start()
    with thread as url:
        answer = httpx.post(url + path, json={})
    assert answer.status_code == 403 and f"{path} needs --api-key" in answer.json()["error"]["message"]


def _tensor_update(client, **body):
    return client.post("/update_weights_from_tensor", json={"weight_version": "99", **body})


def test_unknown_load_format_is_refused(client):
    answer = _tensor_update(client, serialized_named_tensors=[], load_format="pickle")
    assert answer.status_code == 400
    assert answer.json()["message"] == "load_format 'pickle' is not supported; expected safetensors or miles_cuda_ipc"


def test_bad_cuda_ipc_descriptions_are_refused_and_nothing_changes(client, served):
    version = served[1].engine.weight_version
    raw = json.loads(describe([FIELDS], "GPU-x", [IpcTensor("model.norm.weight", torch.float32, (64,), 0)]))
    raw["storages"][0]["storage_size_bytes"] = "4096"
    answer = _tensor_update(client, serialized_named_tensors=[json.dumps(raw)], load_format="miles_cuda_ipc")
    assert answer.status_code == 400
    assert "storage 0: storage_size_bytes must be an integer >= 0, got '4096'" in answer.json()["message"]
    good = describe([FIELDS], "GPU-x", [IpcTensor("model.norm.weight", torch.float32, (64,), 0)])
    answer = _tensor_update(client, serialized_named_tensors=[good], load_format="miles_cuda_ipc")
    assert answer.status_code == 400  # a CPU engine cannot map a GPU buffer
    assert "the engine runs on cpu, not on the trainer's GPU GPU-x" in answer.json()["message"]
    assert served[1].engine.weight_version == version


class FakeIpc:
    """CUDA IPC on CPU: the trainer's storages are this process's memory, a handle names one by its
    address, and `open_storage` (the server's mapping) counts how often it is called."""

    def __init__(self, monkeypatch):
        self.storages, self.opens, self.exports = {}, 0, 0
        monkeypatch.setattr(cuda_ipc, "export_storage", self.export)
        monkeypatch.setattr(cuda_ipc, "device_uuid", lambda device: "GPU-test")
        monkeypatch.setattr(ipc_mapping, "open_storage", self.open)

    def export(self, tensor):
        self.exports += 1
        whole = torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())
        handle = str(whole.data_ptr()).encode()
        self.storages[handle] = whole
        return {**FIELDS, "handle": handle, "storage_size_bytes": whole.numel(), "buffer_bytes": whole.numel()}

    def open(self, fields, uuid, device):
        self.opens += 1
        return self.storages[fields["handle"]]


def _noisy(engine, seed):
    generator = torch.Generator().manual_seed(seed)
    return [(n, p.detach() + torch.randn(p.shape, generator=generator, dtype=p.dtype))
            for n, p in engine.weights.model.named_parameters()]


def _ipc_push(client, staging, descriptions, weights, version):
    """What `CudaIpcSync` sends, on CPU: the weights in buckets through one staging buffer."""
    sent = list(buckets(weights, 60_000))
    for number, bucket in enumerate(sent):
        tensors = [t for _, t in bucket]
        _, offsets = staging.pack_with_offsets(tensors)
        text = descriptions.staged(staging.buffer, [n for n, _ in bucket], tensors, offsets)
        answer = _tensor_update(client, serialized_named_tensors=[text], load_format="miles_cuda_ipc",
                                weight_version=version if number == len(sent) - 1 else None)
        assert answer.status_code == 200, answer.text
    return len(sent)


def _assert_holds(engine, weights):
    for name, tensor in weights:
        held = engine.get_weights_by_name(name)
        assert torch.equal(held.contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


def test_cuda_ipc_pushes_map_the_trainers_buffer_once_and_are_bitwise(monkeypatch):
    fake = FakeIpc(monkeypatch)
    state, thread = start(allow_unauthenticated_weight_updates=True)
    staging, descriptions = FlatStaging(torch.device("cpu"), align=256), IpcDescriptions()
    with thread as url, httpx.Client(base_url=url, timeout=60) as client:
        assert _ipc_push(client, staging, descriptions, _noisy(state.engine, 1), "1") >= 3
        second = _noisy(state.engine, 2)
        _ipc_push(client, staging, descriptions, second, "2")
        _assert_holds(state.engine, second)
        assert (fake.exports, fake.opens, state.engine.weight_version) == (1, 1, "2")
        assert client.post("/release_memory_occupation", json={}).status_code == 200  # lets the mapping go
        assert client.post("/resume_memory_occupation", json={}).status_code == 200
        third = _noisy(state.engine, 3)
        _ipc_push(client, staging, descriptions, third, "3")
        _assert_holds(state.engine, third)
        assert (fake.exports, fake.opens) == (1, 2)
        other = FlatStaging(torch.device("cpu"), align=256)  # another buffer: another handle, mapped anew
        fourth = _noisy(state.engine, 4)
        _ipc_push(client, other, descriptions, fourth, "4")
        _assert_holds(state.engine, fourth)
        assert (fake.exports, fake.opens) == (2, 3)


def test_direct_pushes_map_each_trainer_storage_once_and_are_bitwise(monkeypatch):
    """The trainer's weights where they lie: one description naming every storage, one call a push;
    a push after the first maps nothing, and a storage made afresh is mapped afresh."""
    fake = FakeIpc(monkeypatch)
    state, thread = start(allow_unauthenticated_weight_updates=True)
    descriptions = IpcDescriptions(StorageExports(device_type="cpu"))
    weights = _noisy(state.engine, 1)
    _known_after_a_staged_push(descriptions, weights)
    with thread as url, httpx.Client(base_url=url, timeout=60) as client:
        for version in ("1", "2"):
            answer = _tensor_update(client, serialized_named_tensors=[descriptions.direct(weights)],
                                    load_format="miles_cuda_ipc", weight_version=version, abort_all_requests=True)
            assert answer.status_code == 200, answer.text
            _assert_holds(state.engine, weights)
            for _, tensor in weights:  # the trainer's step writes in place
                tensor.add_(0.5)
        assert (fake.exports, fake.opens, state.engine.weight_version) == (len(weights), len(weights), "2")
        text = descriptions.direct(weights)
        answer = _tensor_update(client, serialized_named_tensors=[reference(text)], load_format="miles_cuda_ipc",
                                weight_version="2r")  # the description again, by its sha256
        assert answer.status_code == 200, answer.text
        _assert_holds(state.engine, weights)
        unknown = reference(text + " ")
        answer = _tensor_update(client, serialized_named_tensors=[unknown], load_format="miles_cuda_ipc")
        assert answer.status_code == 409 and "is not known here" in answer.json()["message"]
        assert state.engine.weight_version == "2r"
        assert not state.worker.paused  # the call held requests while it ran, and let them go
        weights[0] = (weights[0][0], weights[0][1].clone())  # one weight moved: a new storage
        _known_after_a_staged_push(descriptions, weights)
        answer = _tensor_update(client, serialized_named_tensors=[descriptions.direct(weights)],
                                load_format="miles_cuda_ipc", weight_version="3")
        assert answer.status_code == 200, answer.text
        _assert_holds(state.engine, weights)
        assert (fake.exports, fake.opens) == (len(weights) + 1, len(weights) + 1)


def _known_after_a_staged_push(descriptions, weights):
    """What `CudaIpcSync` does after a staged push: the storages it saw may go direct next time."""
    noted: dict = {}
    for _, tensor in weights:
        descriptions.exports.note(tensor, noted)
    descriptions.exports.remember(noted)
    descriptions.forget_direct()


@pytest.mark.parametrize("edit, message", [
    ({"dtypes": ["float32", "complex64"]}, "tensor 'b': unknown dtype 'complex64'; expected one of: float32"),
    ({"shapes": [[2], [3, -1]]}, "tensor 'b' has shape [3, -1]; sizes must be >= 0"),
    ({"names": ["a"]}, "names, dtypes and shapes have 1, 2 and 2 entries; expected one each per tensor"),
    ({"load_format": "zip"}, "load_format 'zip' is not supported here"),
    ({"group_name": "none"}, "no weight-update group 'none' (POST /init_weights_update_group first)"),
])
def test_a_distributed_bucket_is_checked_before_any_broadcast(edit, message):
    """What the route and the local channel both check before they receive: the first bad
    tensor named; a good bucket's dtypes (`torch.` prefix or not) in order."""
    from types import SimpleNamespace

    from miles_core.serve.distributed_weights import DistributedBody, announced
    from miles_core.serve.state import RequestError

    state = SimpleNamespace(weight_groups={"g": "the group"})
    good = {"names": ["a", "b"], "dtypes": ["float32", "torch.bfloat16"], "shapes": [[2], []], "group_name": "g"}
    assert announced(state, DistributedBody(**good)) == ("the group", [torch.float32, torch.bfloat16])
    with pytest.raises(RequestError) as refused:
        announced(state, DistributedBody(**{**good, **edit}))
    assert message in str(refused.value) and refused.value.status == 400
