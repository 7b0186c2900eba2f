"""Host-to-device copies that do not stall the GPU queue, and the current-device switch.

`tensor.to("cuda")` from ordinary (pageable) host memory synchronises the stream: the host waits
until every kernel queued so far has finished, so the GPU then idles while Python queues the next
ones. A training step made about 20 such copies (packed ids, positions, indices, attention
layouts), each one such stall. Copying from pinned memory with `non_blocking=True` is ordered on
the stream like a kernel and returns at once; PyTorch's pinned-memory allocator keeps the host
buffer alive until the copy has run.
"""

from __future__ import annotations

import contextlib

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`; a CPU tensor bound for CUDA goes through pinned memory, asynchronously."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def on_device(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Make `device` current while the block runs: Triton kernels and CUDA graph captures go to the
    current device, not to their tensors' one, so an engine on `cuda:1` of a process whose current
    device is `cuda:0` (`miles serve --set model.device=cuda:1`) must switch first."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
