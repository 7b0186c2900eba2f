"""The weight-update group: rank 0 and a receiver exchange tensors bitwise over gloo without a
default process group; a receiver built the way SGLang builds its group (torch's rendezvous and
process-group helper) joins a group miles hosts; dtype names and the exact digest."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed as dist

from miles_core.errors import MilesError
from miles_core.sync.group import WeightGroup, dtype_name, host_store, parse_dtype, resolve_backend, tensor_sha256
from miles_core.sync.protocol import with_last
from tests.child_env import ROOT


def test_two_ranks_broadcast_bitwise_without_a_default_group():
    store = host_store(0, 2, timeout_s=30)
    sent = torch.randn(7, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    received = {}

    def rank1():
        group = WeightGroup(master_address="127.0.0.1", master_port=store.port, rank=1, world_size=2,
                            group_name="g", backend="gloo", timeout_s=30)
        tensor = torch.zeros(7, 3, dtype=torch.bfloat16)
        group.broadcast(tensor)
        received["tensor"] = tensor
        group.destroy()

    thread = threading.Thread(target=rank1)
    thread.start()
    group = WeightGroup(master_address="", master_port=store.port, rank=0, world_size=2, group_name="g",
                        backend="gloo", timeout_s=30, store=store)
    group.broadcast(sent)
    thread.join(timeout=30)
    assert torch.equal(received["tensor"], sent) and not dist.is_initialized()
    group.destroy()


SGLANG_STYLE_RANK = """
import sys
from datetime import timedelta
import torch
from torch.distributed.distributed_c10d import (Backend, BroadcastOptions, PrefixStore, _new_process_group_helper,
                                                rendezvous)
port, name = int(sys.argv[1]), sys.argv[2]
timeout = timedelta(seconds=30)
store, rank, world_size = next(rendezvous(f"tcp://127.0.0.1:{port}", 1, 2, timeout=timeout))
store.set_timeout(timeout)
pg, _ = _new_process_group_helper(2, 1, [], Backend("gloo"), PrefixStore(name, store), group_name=name,
                                  backend_options=None, timeout=timeout)
tensor = torch.zeros(5)
options = BroadcastOptions()
options.rootRank = 0
pg._get_backend(torch.device("cuda")).broadcast([tensor], options).wait()  # the backend a CUDA tensor uses
print(tensor.tolist())
"""


def test_a_receiver_built_like_sglangs_joins_a_miles_group():
    store = host_store(0, 2, timeout_s=30)
    receiver = subprocess.Popen([sys.executable, "-c", SGLANG_STYLE_RANK, str(store.port), "weights-x"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        group = WeightGroup(master_address="", master_port=store.port, rank=0, world_size=2, group_name="weights-x",
                            backend="gloo", timeout_s=30, store=store)
        group.broadcast(torch.tensor([1.5, -2.0, 3.25, 0.0, 8.0]))
        output = receiver.communicate(timeout=60)[0]
    finally:
        receiver.kill()
    assert output.strip().splitlines()[-1] == "[1.5, -2.0, 3.25, 0.0, 8.0]", output
    group.destroy()


def test_dtype_names_and_backend_choice():
    assert dtype_name(torch.bfloat16) == "bfloat16" and parse_dtype("torch.float16", "x") is torch.float16
    with pytest.raises(MilesError, match="t: unknown dtype 'complex64'; expected one of: float32, float16"):
        parse_dtype("complex64", "t")
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"
    assert list(with_last("abc")) == [("a", False), ("b", False), ("c", True)] and list(with_last([])) == []


def test_digest_is_exact():
    tensor = torch.tensor([1.0, 2.0, 3.0])
    nudged = tensor.clone()
    nudged[1] = torch.nextafter(nudged[1], torch.tensor(3.0))  # one ulp
    assert tensor_sha256(tensor) == tensor_sha256(tensor.clone())
    assert tensor_sha256(tensor) != tensor_sha256(nudged)
    assert tensor_sha256(tensor) != tensor_sha256(tensor.to(torch.float64))  # the dtype is part of it
    assert tensor_sha256(tensor) != tensor_sha256(tensor.reshape(3, 1))  # and the shape
