"""Ranks on this machine, as torchrun starts them: rank 0 is this process, ranks 1..N-1 are
spawned children; all join one process group (gloo on CPU, NCCL on GPU, one GPU per rank).

Shutdown leaves no process behind: children die with their parent (Linux parent-death signal),
ignore Ctrl-C (rank 0 handles it: it finishes the step, saves, then releases them), and are
terminated, then killed, when rank 0 leaves for any reason. A child that fails makes rank 0's
next collective fail (the process group sees the peer gone), and the child's exit code is named.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from miles_core.errors import MilesError

T = TypeVar("T")
_PR_SET_PDEATHSIG = 1
TIMEOUT = timedelta(minutes=30)
"""How long a collective may wait for a peer before it fails (the process group's timeout)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_group_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def run_ranks(num_ranks: int, leader: Callable[[], T], worker: Callable[..., None], worker_args: tuple[Any, ...],
              *, join_timeout: float = 120.0) -> T:
    """`leader()` as rank 0 here, `worker(*worker_args)` as ranks 1..N-1 in spawned processes;
    returns the leader's result once every worker exited cleanly."""
    init_method, backend = f"tcp://127.0.0.1:{free_port()}", process_group_backend()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker_main, args=(rank, num_ranks, init_method, backend, worker, worker_args),
                               name=f"miles-rank-{rank}") for rank in range(1, num_ranks)]
    for process in workers:
        process.start()
    try:
        _init(0, num_ranks, init_method, backend)
        result = leader()
        # Leave the group before waiting for the workers: NCCL's teardown waits for every rank,
        # so a leader that joined first held each worker in its own teardown until the join timed out.
        _leave_group()
        for process in workers:
            process.join(join_timeout)
        failed = [f"rank {p.name.rsplit('-', 1)[1]} exit code {p.exitcode}" for p in workers if p.exitcode != 0]
        if failed:
            raise MilesError(f"trainer ranks failed: {', '.join(failed)}")
        return result
    except Exception as err:
        dead = _dead_workers(workers)
        if dead and not isinstance(err, MilesError):
            raise MilesError(f"a trainer rank died ({', '.join(dead)}): {err}") from err
        raise
    finally:
        _stop(workers)
        _leave_group()


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _dead_workers(workers: list, wait: float = 3.0) -> list[str]:
    """The workers that exited with an error; a peer's failure can reach rank 0 (closed
    connection) a moment before its exit code does, so wait up to `wait` seconds for one."""
    deadline = time.monotonic() + wait
    while True:
        dead = [f"rank {p.name.rsplit('-', 1)[1]} exit code {p.exitcode}" for p in workers
                if p.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)


def _init(rank: int, world_size: int, init_method: str, backend: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=TIMEOUT)


def _stop(workers: list) -> None:
    """Terminate, then kill, every worker still running; reap them all."""
    for process in workers:
        if process.is_alive():
            process.terminate()
    for process in workers:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


def _worker_main(rank: int, world_size: int, init_method: str, backend: str, worker: Callable[..., None],
                 worker_args: tuple[Any, ...]) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 owns Ctrl-C and releases us
    try:
        _init(rank, world_size, init_method, backend)
        worker(*worker_args)
    except BaseException:
        traceback.print_exc()
        raise SystemExit(1)
    finally:
        _leave_group()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so no rank outlives rank 0."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
