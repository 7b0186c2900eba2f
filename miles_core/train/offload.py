"""The optimizer state in host memory while the rollout engine has the GPU (engine.colocate).

AdamW keeps two fp32 moments per parameter: twice the fp32 weights, the trainer's largest GPU
cost between steps. While the colocated engine generates, `offload` moves every state tensor to
host memory (pinned when it lived on CUDA, so the copies run at bus speed and asynchronously) and
`reload` puts it back on its device, the same bits, before the next optimizer step. The tensors
are replaced in `optimizer.state`, so nothing keeps the GPU copies alive. FSDP2 state is a DTensor:
its local shard is moved and the DTensor rebuilt with the same mesh, placements, shape and stride.

Host tensors are copied even when the state already lives in host memory (a CPU run): one code
path everywhere, nothing freed there; `offload` reports only the bytes moved off an accelerator.

The trainer reloads as it starts training (`reload(overlap=True)`): the copies run on a side
stream while its first forward passes compute, and the optimizer step waits for them on the GPU
(`wait_reloaded`), never the host. The first copy into memory a colocated server process has just
given back runs at half the bus speed (presumably the driver clearing that process's pages): 236
ms a step for 3.7 GB of AdamW state (0.6B-shaped model, H200) against 73 ms for the offload
(`bench/results/multi_gpu_step.md`, run 5). Anything that reads or frees the state waits first.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class _Placement:
    """Where an offloaded state tensor came from, and its DTensor layout when it was one."""

    device: torch.device
    mesh: object = None
    placements: tuple = ()
    shape: torch.Size | None = None
    stride: tuple[int, ...] = ()


class OptimizerOffload:
    """Moves one optimizer's state to host memory and back."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._moved: dict[tuple[int, str], _Placement] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._reloading: dict[torch.device, torch.cuda.Event] = {}
        """Per device, the event after an overlapped reload's copies, until a stream waits on it."""

    @property
    def offloaded(self) -> bool:
        return bool(self._moved)

    def offload(self) -> int:
        """Move the state to host memory; returns the bytes that left an accelerator (0 on CPU)."""
        self.wait_reloaded()  # an overlapped reload's copies land before the state is read
        if self.offloaded:
            return 0
        moved = 0
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                local = value.to_local() if isinstance(value, DTensor) else value
                self._moved[id(param), key] = _placement(value, local.device)
                state[key] = _host_copy(local)
                if local.device.type != "cpu":
                    moved += local.numel() * local.element_size()
        _synchronize()
        return moved

    def reload(self, overlap: bool = False) -> None:
        """Put every offloaded tensor back on its device (and into its DTensor). With `overlap`,
        copies from pinned memory to CUDA run on a side stream and this returns at once: the
        state must not be read before `wait_reloaded`."""
        if not overlap:
            self.wait_reloaded()
        if not self.offloaded:
            return
        copies: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for param, state in self.optimizer.state.items():
            for key, value in list(state.items()):
                placement = self._moved.get((id(param), key))
                if placement is None:
                    continue
                if overlap and placement.device.type == "cuda" and value.is_pinned():
                    local = torch.empty_like(value, device=placement.device)
                    copies.setdefault(placement.device, []).append((local, value))
                else:
                    local = value.to(placement.device, non_blocking=value.is_pinned(), copy=True)
                state[key] = local if placement.mesh is None else DTensor.from_local(
                    local, placement.mesh, placement.placements, run_check=False, shape=placement.shape,
                    stride=placement.stride)
        self._moved.clear()
        for device, pairs in copies.items():
            self._reloading[device] = self._copy_aside(device, pairs)
        if not copies:
            _synchronize()

    def wait_reloaded(self) -> None:
        """Order each device's current stream after an overlapped reload's copies (no host wait)."""
        for device, event in self._reloading.items():
            torch.cuda.current_stream(device).wait_event(event)
        self._reloading.clear()

    def _copy_aside(self, device: torch.device, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.cuda.Event:
        """Copy each (device tensor, pinned host tensor) pair on `device`'s side stream; the event
        after them. The side stream first waits for the current one: the tensors were allocated
        on it, maybe over memory its queued work still uses."""
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # the host tensors' pinned blocks are kept until this stream passes
            for local, host in pairs:
                local.copy_(host, non_blocking=True)
            return stream.record_event()

    @contextmanager
    def on_device(self):
        """The state on its device for the block (checkpoint save and load), as before after it."""
        was = self.offloaded
        self.reload()
        try:
            yield
        finally:
            if was:
                self.offload()


class OptimizerOffloads:
    """The offloads of a trainer's optimizers (the policy's, a critic's), moved together."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.offloads = [OptimizerOffload(optimizer) for optimizer in optimizers]

    def offload(self) -> int:
        return sum(offload.offload() for offload in self.offloads)

    def reload(self, overlap: bool = False) -> None:
        for offload in self.offloads:
            offload.reload(overlap)

    def wait_reloaded(self) -> None:
        for offload in self.offloads:
            offload.wait_reloaded()

    @contextmanager
    def on_device(self):
        with ExitStack() as stack:
            for offload in self.offloads:
                stack.enter_context(offload.on_device())
            yield


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    host = torch.empty_like(tensor, device="cpu", pin_memory=tensor.is_cuda)
    host.copy_(tensor, non_blocking=tensor.is_cuda)
    return host


def _placement(value: torch.Tensor, device: torch.device) -> _Placement:
    if not isinstance(value, DTensor):
        return _Placement(device)
    return _Placement(device, value.device_mesh, tuple(value.placements), value.shape, value.stride())


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # host copies must land before the GPU memory is reused
