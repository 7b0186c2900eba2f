"""Run one function on N fresh gloo ranks (spawned processes, none of them the test process) and
return rank 0's result: the harness of the tensor-parallel tests, which keeps megatron-core's
process-wide state out of the pytest process."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from miles_core.launch.local import free_port


def _rank_main(rank: int, world_size: int, port: int, out: str, fn: Callable, args: tuple) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # megatron-core's import-time notes, once per rank
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, *args)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def run_spmd(fn: Callable, *args, world_size: int = 2):
    """`fn(rank, *args)` on every rank; rank 0's return value (anything `torch.save` takes)."""
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result.pt")
        mp.spawn(_rank_main, args=(world_size, free_port(), out, fn, args), nprocs=world_size, join=True)
        return torch.load(out, weights_only=False)
