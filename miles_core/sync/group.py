"""The weight-update process group: rank 0 (the trainer) and every engine rank, apart from the
default process group, plus the names, checksums and checks both ends of a transport share.

The group is wire-compatible with SGLang's `init_custom_process_group` (and slime's, verl's):
rank 0 hosts a `TCPStore` at `master_address:master_port`, every rank reaches it, and the
backend rendezvous happens under the same key prefixes SGLang's helper uses
(`PrefixStore(group_name)`, then `"{group_name}/"`, then `"{device}/"`, with the same backends and
sequence numbers), so a real SGLang server joins a group that miles created. Unlike that helper, the backend
(`ProcessGroupGloo` / `ProcessGroupNCCL`) is built directly from the store: the group is never
registered with `torch.distributed`'s global state and never split from the default group, so a
trainer that already runs FSDP on the default group is not disturbed (a split would need every
default-group rank to take part).
"""

from __future__ import annotations

import hashlib
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from miles_core.errors import MilesError

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in (
        "float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2",
        "int8", "uint8", "int16", "int32", "int64", "bool",
    )
}
"""Tensor dtypes a weight update may carry, by the name SGLang sends (`str(dtype)` less `torch.`)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, where: str) -> torch.dtype:
    """The torch dtype called `name`; a one-line error naming `where` otherwise."""
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise MilesError(f"{where}: unknown dtype '{name}'; expected one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of the tensor's dtype, shape and bytes (exact: equal digests mean equal bits)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    digest = hashlib.sha256(f"{dtype_name(tensor.dtype)}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def resolve_backend(choice: str, device: torch.device) -> str:
    """`sync.nccl_backend`: `auto` is nccl for CUDA weights, gloo for CPU ones."""
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" else "gloo"


class WeightGroup:
    """This process's rank in a weight-update group; rank 0 broadcasts, every other rank receives."""

    def __init__(self, *, master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                 backend: str, timeout_s: float, store: dist.TCPStore | None = None) -> None:
        if backend not in ("nccl", "gloo"):
            raise MilesError(f"weight-update group backend '{backend}' is not supported; expected nccl or gloo")
        if not 0 <= rank < world_size:
            raise MilesError(f"weight-update group: rank {rank} is outside world_size {world_size}")
        timeout = timedelta(seconds=timeout_s)
        if store is None:  # rank 0 passes the store it hosts (see `host_store`)
            store = _connect(master_address, master_port, world_size)
            store.set_timeout(timeout)  # the rendezvous below waits for every rank
        self.store, self.rank, self.world_size, self.name, self.backend = store, rank, world_size, group_name, backend
        # As torch's helper does: one backend under the first device type of its map ("cpu/" for
        # gloo, which serves CUDA tensors too; "cuda/" for NCCL), then its sequence number.
        device = "cpu" if backend == "gloo" else "cuda"
        device_store = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{group_name}/",
                                                                       dist.PrefixStore(group_name, store)))
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(device_store, rank, world_size, timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(device_store, rank, world_size, options)
        self.pg._set_sequence_number_for_group()

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Send (rank 0) or receive (others) `tensor` in place; returns once it is complete here."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.pg.broadcast([tensor], options).wait()

    def destroy(self) -> None:
        """Leave the group now. NCCL's `shutdown` finalizes, which waits for every other rank (a rank
        that is gone would hang it); `abort` frees the communicator at once, on this rank alone."""
        if self.pg is None:
            return
        leave = getattr(self.pg, "abort", None) or getattr(self.pg, "shutdown", None)
        if callable(leave):
            leave()
        self.pg = None


CONNECT_TIMEOUT_S = 10.0
"""Seconds to reach rank 0's store: it is up before any server is asked to join."""


def _connect(address: str, port: int, world_size: int) -> dist.TCPStore:
    """A client of rank 0's store; an address nobody listens at fails at once, not at the timeout."""
    try:
        socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S).close()
        return dist.TCPStore(address, port, world_size, is_master=False,
                             timeout=timedelta(seconds=CONNECT_TIMEOUT_S), wait_for_workers=False)
    except (OSError, RuntimeError, ValueError) as err:  # torch: RuntimeError; a NUL or bad IDNA name: ValueError
        raise MilesError(f"cannot reach the weight-update group's store at {address}:{port} ({err})") from None


def host_store(master_port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store; port 0 picks a free port (read it back from `.port`)."""
    return dist.TCPStore("0.0.0.0", master_port, world_size, is_master=True,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
