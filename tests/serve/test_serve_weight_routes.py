"""The weight routes of `miles serve` that need no peer: they are protected like the other weight
routes, and `/update_weights_from_tensor` refuses unknown load formats and bad or unmappable CUDA
IPC descriptions with one line, keeping the old weights."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from miles_core.sync.cuda_ipc import IpcTensor, describe
from tests.serve.conftest import start

FIELDS = {"device_index": 0, "handle": b"h", "storage_size_bytes": 4096, "storage_offset_bytes": 0,
          "ref_counter_handle": b"r", "ref_counter_offset": 0, "event_handle": b"e", "event_sync_required": False,
          "buffer_offset": 0, "buffer_bytes": 4096}


@pytest.mark.parametrize("path", ["/init_weights_update_group", "/update_weights_from_distributed",
                                  "/destroy_weights_update_group"])
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
    raw = json.loads(describe(FIELDS, "GPU-x", [IpcTensor("model.norm.weight", torch.float32, (64,), 0)]))
    raw["storage_size_bytes"] = "4096"
    answer = _tensor_update(client, serialized_named_tensors=[json.dumps(raw)], load_format="miles_cuda_ipc")
    assert answer.status_code == 400
    assert "storage_size_bytes must be an integer >= 0, got '4096'" in answer.json()["message"]
    good = describe(FIELDS, "GPU-x", [IpcTensor("model.norm.weight", torch.float32, (64,), 0)])
    answer = _tensor_update(client, serialized_named_tensors=[good], load_format="miles_cuda_ipc")
    assert answer.status_code == 400  # a CPU engine cannot map a GPU buffer
    assert "the engine runs on cpu, not on the trainer's GPU GPU-x" in answer.json()["message"]
    assert served[1].engine.weight_version == version
