"""The optimizer state in host memory while the rollout engine has the GPU (engine.colocate).

AdamW keeps two fp32 moments per parameter: twice the fp32 weights, the trainer's largest GPU
cost between steps. While the colocated engine generates, `offload` moves every state tensor to
host memory (pinned when it lived on CUDA, so the copies run at bus speed and asynchronously) and
`reload` puts it back on its device, the same bits, before the next optimizer step. The tensors
are replaced in `optimizer.state`, so nothing keeps the GPU copies alive. FSDP2 state is a DTensor:
its local shard is moved and the DTensor rebuilt with the same mesh, placements, shape and stride.

Host tensors are copied even when the state already lives in host memory (a CPU run): one code
path everywhere, nothing freed there; `offload` reports only the bytes moved off an accelerator.
"""

from __future__ import annotations

from contextlib import contextmanager
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

    @property
    def offloaded(self) -> bool:
        return bool(self._moved)

    def offload(self) -> int:
        """Move the state to host memory; returns the bytes that left an accelerator (0 on CPU)."""
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

    def reload(self) -> None:
        """Put every offloaded tensor back on its device (and into its DTensor)."""
        if not self.offloaded:
            return
        for param, state in self.optimizer.state.items():
            for key, value in list(state.items()):
                placement = self._moved.get((id(param), key))
                if placement is None:
                    continue
                local = value.to(placement.device, non_blocking=value.is_pinned(), copy=True)
                state[key] = local if placement.mesh is None else DTensor.from_local(
                    local, placement.mesh, placement.placements, run_check=False, shape=placement.shape,
                    stride=placement.stride)
        self._moved.clear()
        _synchronize()

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
