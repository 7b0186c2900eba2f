"""Trainer ranks placed by Ray (`miles train --ray`): the ranks of `launch/local.py`, each a Ray
actor in one placement group with one bundle per rank (`{"GPU": 1, "CPU": 1}` when the cluster has
GPUs, else `{"CPU": 1}`; PACK: a node is filled before the next). They join one process group
(NCCL with one GPU per rank, else gloo) at rank 0's node address and run the same code as local
ranks: rank 0 `leader` (the whole loop), the others `worker`.

Colocated rollout servers (`engine.colocate` with `engine.launch`): server i shares trainer rank
i's bundle and GPU, so that bundle holds one CPU more and the rank takes `COLOCATED_GPU_SHARE` of
its GPU, the server the rest (Ray gives both actors the same device).

Rank 0 is an actor, not this driver process: a driver holds no Ray resources, so Ray could hand
rank 0's GPU to another rank, and on a cluster the driver's node need not have one; and the driver
stays free to supervise. It waits on every rank at once, and the moment one fails it kills all
of them, even a rank 0 stuck in a collective with the failed peer (a Ray actor whose method
raised stays alive, so its peers would otherwise wait out the process group's timeout).

Stopping: when `should_stop()` turns true (the CLI's Ctrl-C), rank 0 is asked to stop after the
step, saves, releases the others and the run ends with `RunStopped`, as without Ray. On any
exit (success, a failed rank, a second Ctrl-C) every actor is killed, the placement group
removed, and Ray shut down when this call started it. Without `RAY_ADDRESS` (a cluster started
with `ray start`) a local Ray is started with at least one CPU per rank.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from miles_core.errors import MilesError, RunStopped
from miles_core.launch.local import TIMEOUT, free_port

T = TypeVar("T")
PLACEMENT_TIMEOUT_S = 120.0
"""How long to wait for Ray to find room for every rank before giving up with an error."""
COLOCATED_GPU_SHARE = 0.5
"""Of a GPU shared by a trainer rank and a colocated server, the rank's share (the server's is the
rest): Ray only counts it; the two take turns on the memory (`engine.colocate`)."""
_POLL_S = 0.2


def import_ray():
    try:
        import ray
    except ImportError:
        raise MilesError("--ray needs Ray: pip install 'miles[ray]'") from None
    return ray


class RankActor:
    """One trainer rank in a Ray worker process; threaded (two calls at once) so the driver can
    drain rank 0's step metrics and ask it to stop while `lead` runs."""

    def __init__(self) -> None:
        self._stop, self._steps = threading.Event(), queue.SimpleQueue()

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def pid(self) -> int:
        return os.getpid()

    def run(self, rank: int, world_size: int, init_method: str, backend: str, fn: Callable[..., Any],
            args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        if backend == "nccl":  # Ray shows this actor only its own GPU
            import torch

            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=TIMEOUT)
        result = fn(*args, **(kwargs or {}))
        # Only on success: a failed rank keeps its group, so its peers wait for the driver's kill
        # instead of failing first with a less telling "connection closed".
        dist.destroy_process_group()
        return result

    def lead(self, world_size: int, init_method: str, backend: str, leader: Callable[..., T]) -> Any:
        hooks = {"on_step": lambda step, metrics: self._steps.put((step, metrics)), "should_stop": self._stop.is_set}
        try:
            return self.run(0, world_size, init_method, backend, leader, (), hooks)
        except RunStopped as stopped:  # its own __init__ does not survive pickling
            return _Stopped(stopped.step, stopped.checkpoint)

    def request_stop(self) -> None:
        self._stop.set()

    def drain_steps(self) -> list[tuple[int, dict]]:
        steps = []
        while not self._steps.empty():
            steps.append(self._steps.get())
        return steps


class _Stopped:
    def __init__(self, step: int, checkpoint: object | None) -> None:
        self.step, self.checkpoint = step, checkpoint


def run_ray_ranks(num_ranks: int, leader: Callable[..., T], worker: Callable[..., None],
                  worker_args: tuple[Any, ...], *, on_step: Callable[[int, dict], None] | None = None,
                  should_stop: Callable[[], bool] = lambda: False, num_servers: int = 0,
                  colocated: bool = False) -> T:
    """`leader(on_step=, should_stop=)` as rank 0 and `worker(*worker_args)` as ranks 1..N-1, each
    a Ray actor; `leader`'s result once every rank returned. Both must pickle (module-level
    functions, `functools.partial`). `num_servers`: rollout servers rank 0 will ask Ray for
    (`engine/ray_servers.py`), counted when this call starts a local Ray; `colocated`: in the
    bundles of ranks 0..num_servers-1 (module docstring)."""
    if colocated and num_servers > num_ranks:
        raise MilesError(f"engine.colocate under --ray places each rollout server on a trainer rank's GPU: "
                         f"{num_servers} servers need at least {num_servers} trainer ranks, got {num_ranks}")
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        _start_ray(ray, num_ranks + num_servers)
    group, actors = None, []
    try:
        group, bundles = _placement_group(ray, num_ranks, num_servers if colocated else 0)
        actors = _start_actors(ray, group, bundles)
        host, port = ray.get(actors[0].address.remote())
        init_method, backend = f"tcp://{host}:{port}", "nccl" if "GPU" in bundles[0] else "gloo"
        refs = {actors[0].lead.remote(num_ranks, init_method, backend, leader): 0}
        refs.update({actor.run.remote(rank, num_ranks, init_method, backend, worker, worker_args): rank
                     for rank, actor in enumerate(actors) if rank > 0})
        return _supervise(ray, refs, actors[0], on_step or (lambda step, metrics: None), should_stop)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if group is not None:
            ray.util.remove_placement_group(group)
        if started:
            ray.shutdown()


def _start_ray(ray, num_actors: int) -> None:
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:  # CPU ranks may share cores, as the local launcher's processes do
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_actors), include_dashboard=False)


def _placement_group(ray, num_ranks: int, num_colocated: int = 0) -> tuple[object, list[dict]]:
    """The ranks' placement group and its bundles: `{"GPU": 1, "CPU": 1}` each (`{"CPU": 1}`
    without GPUs), one CPU more in the first `num_colocated` (a colocated server's)."""
    use_gpus = ray.cluster_resources().get("GPU", 0) > 0
    bundles = [{**({"GPU": 1} if use_gpus else {}), "CPU": 1 + (rank < num_colocated)} for rank in range(num_ranks)]
    group = ray.util.placement_group(bundles, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        ray.util.remove_placement_group(group)
        have = {key: ray.cluster_resources().get(key, 0) for key in bundles[0]}
        raise MilesError(f"Ray cannot place {num_ranks} trainer ranks of {bundles[-1]} each"
                         f"{f' ({num_colocated} with a colocated server)' if num_colocated else ''} within "
                         f"{PLACEMENT_TIMEOUT_S:.0f} s: the cluster has {have}")
    return group, bundles


def _start_actors(ray, group, bundles: list[dict]) -> list:
    """One rank actor per bundle: one CPU, and its GPU (`COLOCATED_GPU_SHARE` of it when the bundle
    also holds a colocated server)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    actor_class = ray.remote(RankActor)
    return [actor_class.options(
        num_cpus=1, num_gpus=bundle.get("GPU", 0) * (COLOCATED_GPU_SHARE if bundle["CPU"] > 1 else 1),
        max_concurrency=2,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
    ).remote() for rank, bundle in enumerate(bundles)]


def _supervise(ray, refs: dict, lead_actor, on_step, should_stop) -> Any:
    """Every rank's result; the first failure raised at once (the caller then kills the rest)."""
    pending, result, stop_sent = list(refs), None, False
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=_POLL_S)
        for ref in done:
            value = _result(ray, ref, refs[ref])
            result = value if refs[ref] == 0 else result
        try:
            if should_stop() and not stop_sent:
                lead_actor.request_stop.remote()
                stop_sent = True
            for step, metrics in ray.get(lead_actor.drain_steps.remote()):
                on_step(step, metrics)
        except ray.exceptions.RayActorError:
            pass  # rank 0 died: its own result, next round, names the error
    if isinstance(result, _Stopped):
        raise RunStopped(result.step, result.checkpoint)
    return result


def _result(ray, ref, rank: int) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, MilesError):
            raise MilesError(f"trainer rank {rank}: {cause}") from None
        raise MilesError(f"trainer rank {rank} failed: {type(cause or err).__name__}: {cause or err}") from None
    except ray.exceptions.RayActorError as err:
        raise MilesError(f"trainer rank {rank} died: {err}") from None
