"""`sync.transport = "cuda_ipc"`: the JSON description of a shared bucket (layout, encoding, every
check the server makes before it maps anything) on CPU, and a real push to a `miles serve`
subprocess on the same GPU (GPU tests)."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from miles_core.errors import MilesError
from miles_core.sync.cuda_ipc import IpcTensor, describe, layout, parse_description

FIELDS = {"device_index": 0, "handle": b"\x01handle\xff", "storage_size_bytes": 4096, "storage_offset_bytes": 512,
          "ref_counter_handle": b"ref", "ref_counter_offset": 3, "event_handle": b"\x00ev",
          "event_sync_required": True, "buffer_offset": 0, "buffer_bytes": 1024}


def test_layout_aligns_every_tensor_to_256_bytes():
    # f32 (3,) = 12 B at 0; bf16 (2, 2) = 8 B at 256; f32 (100,) = 400 B at 512; ends at 912
    offsets, size = layout([((3,), torch.float32), ((2, 2), torch.bfloat16), ((100,), torch.float32)])
    assert (offsets, size) == ([0, 256, 512], 912)


def _tensors():
    return [IpcTensor("a.weight", torch.float32, (3,), 0), IpcTensor("b.weight", torch.bfloat16, (2, 2), 256)]


def test_description_round_trips_through_json():
    text = describe(FIELDS, "GPU-1234", _tensors())
    raw = json.loads(text)
    assert raw["handle"] == base64.b64encode(b"\x01handle\xff").decode() and raw["tensors"][1]["dtype"] == "bfloat16"
    bucket = parse_description(text)
    assert bucket.device_uuid == "GPU-1234" and bucket.fields == FIELDS and list(bucket.tensors) == _tensors()
    assert [t.nbytes for t in bucket.tensors] == [12, 8]


def _edited(**changes) -> str:
    raw = json.loads(describe(FIELDS, "GPU-1234", _tensors()))
    raw.update(changes)
    return json.dumps(raw)


def _tensor_edit(**changes) -> str:
    raw = json.loads(describe(FIELDS, "GPU-1234", _tensors()))
    raw["tensors"][1].update(changes)
    return json.dumps(raw)


@pytest.mark.parametrize("text, message", [
    ("not json", "the description is not JSON"),
    (json.dumps({"format": "pickle"}), "expected a JSON object with format 'miles_cuda_ipc'"),
    (_edited(storage_size_bytes=-1), r"storage_size_bytes must be an integer >= 0, got -1"),
    (_edited(ref_counter_offset=True), r"ref_counter_offset must be an integer >= 0, got True"),
    (_edited(handle="%%%"), "handle must be base64"),
    (_edited(event_sync_required=1), "event_sync_required must be true or false"),
    (_edited(device_uuid=""), "device_uuid must be a non-empty string"),
    (_edited(buffer_offset=3584), r"buffer \[3584, \+1024\) lies outside its storage of 4096 bytes"),
    (_edited(tensors=[]), "tensors must be a non-empty list"),
    (_tensor_edit(name="a.weight"), "tensor 'a.weight' is listed twice"),
    (_tensor_edit(dtype="complex64"), "unknown dtype 'complex64'"),
    (_tensor_edit(shape=[2, -2]), r"tensor 'b.weight' has shape \[2, -2\]"),
    (_tensor_edit(offset=260), "tensor 'b.weight' at byte 260 \\(\\+8\\) is not 256-aligned"),
    (_tensor_edit(shape=[600]), "tensor 'b.weight' at byte 256 \\(\\+1200\\) is not 256-aligned inside the 1024-byte"),
])
def test_every_bad_field_is_refused_by_name(text, message):
    with pytest.raises(MilesError, match=message):
        parse_description(text)


@pytest.mark.gpu
def test_cuda_ipc_push_to_a_served_engine_on_the_same_gpu_is_bitwise():
    from miles_core.checkpoint.loading import load_model
    from miles_core.config import ModelConfig, SyncConfig
    from miles_core.sync import build_weight_sync
    from miles_core.sync.group import tensor_sha256
    from tests.sync.servers import ServeProcess, client_engine, digests, trained, version_of

    model = load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model
    server = ServeProcess(device="cuda:0").wait_ready()
    try:
        engine = client_engine(server)
        sync = build_weight_sync(SyncConfig(transport="cuda_ipc", check_weight_update_equal=True, timeout_s=120),
                                 engine)
        inner = sync.inner.inner
        inner.bucket_bytes = 100_000  # several buckets through one buffer
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
