"""Rollout servers placed by Ray (`engine.launch` under `miles train --ray`): each server a Ray
actor in a placement group of its own, one bundle per server (`{"GPU": engine.num_gpus_per_engine,
"CPU": 1}` on a cluster with GPUs, else `{"CPU": 1}`; PACK), on whichever nodes Ray finds room.

Colocated (`engine.colocate`): no group of their own; server i goes into trainer rank i's bundle
of the run's group (`launch/ray_launch.py` made it one CPU larger) and takes the rest of that
rank's GPU, so both see the same device and take turns on it. One GPU per server there.

Rank 0 of the run is itself a Ray actor then: it sees only its own GPU, so it cannot start servers
on the GPUs after it as `engine/servers.py` does on one machine. It asks Ray instead. Inside its
actor, each server is launched exactly as on one machine (`launch_servers`: the same command line,
health wait and logs) on the GPUs Ray gave that actor, listening on its node's address, so rank 0
reaches it from any node. All servers share one api key, made here.

Lifetime: `RayFleet.stop` (the engine's `close`, or a failed start) stops every server and kills
its actor; the actors are owned by rank 0's actor, so Ray kills them with it when the run's actors
are killed, and each server process dies with its actor (the parent-death signal of
`servers.py`): no server outlives the run.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys

from miles_core.config import EngineConfig
from miles_core.engine.servers import LaunchContext, launch_servers
from miles_core.errors import MilesError
from miles_core.launch.local import free_port
from miles_core.launch.ray_launch import COLOCATED_GPU_SHARE

PLACEMENT_TIMEOUT_S = 120.0
"""How long to wait for Ray to find room for every server before giving up with an error."""


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (rank 0 of `miles train --ray`)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


class ServerActor:
    """One rollout server in a Ray worker process (on the GPUs Ray gave this actor)."""

    def __init__(self) -> None:
        self.fleet = None

    def start(self, cfg: EngineConfig, model_path: str, dtype: str, on_gpu: bool, context: LaunchContext) -> str:
        import ray

        url = f"http://{ray.util.get_node_ip_address()}:{free_port()}"
        cfg = dataclasses.replace(cfg, urls=(url,), num_gpus=0)  # one server, at this node's address
        _, self.fleet = launch_servers(cfg, model_path, dtype=dtype, on_gpu=on_gpu,
                                       context=dataclasses.replace(context, trainer_gpus=0))
        return self.fleet.urls[0]

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()

    def server_pid(self) -> int:
        """The server process's id (to check that none outlives the run)."""
        return self.fleet.servers[0].process.pid


@dataclasses.dataclass
class RayFleet:
    """The servers' actors and placement group; `urls` for the client, `stop` to end them all."""

    actors: list
    group: object
    urls: list[str]

    def stop(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.get(actor.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead or stuck actor is killed below all the same
                pass
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self.group is not None:
            ray.util.remove_placement_group(self.group)
            self.group = None


def num_servers(cfg: EngineConfig) -> int:
    return cfg.num_gpus // cfg.num_gpus_per_engine if cfg.num_gpus else max(len(cfg.urls), 1)


def launch_ray_servers(cfg: EngineConfig, model_path: str, *, dtype: str, on_gpu: bool,
                       context: LaunchContext) -> tuple[EngineConfig, RayFleet]:
    """Start `num_servers(cfg)` servers as Ray actors and wait until all are healthy; returns the
    engine config the client must use (with the api key) and the fleet to stop later."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    if cfg.server == "miles" and not cfg.api_key:  # their weight and memory routes need one
        cfg = dataclasses.replace(cfg, api_key=secrets.token_hex(16))
    count = num_servers(cfg)
    fleet, group, gpus = _colocated_group(cfg, count, on_gpu) if cfg.colocate else _own_group(cfg, count, on_gpu)
    actor_class = ray.remote(ServerActor)
    fleet.actors = [actor_class.options(
        num_cpus=1, num_gpus=gpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
    ).remote() for index in range(count)]
    try:
        fleet.urls = ray.get([a.start.remote(cfg, model_path, dtype, on_gpu, context) for a in fleet.actors])
    except BaseException as err:
        fleet.stop()
        cause = getattr(err, "cause", None) or err
        raise MilesError(f"a rollout server placed by Ray failed to start: {str(cause).strip().splitlines()[-1]}") \
            from None
    return cfg, fleet


def _own_group(cfg: EngineConfig, count: int, on_gpu: bool) -> tuple[RayFleet, object, float]:
    """A placement group for the servers alone (the fleet owns it); the GPUs of each server."""
    import ray

    bundle = {"GPU": cfg.num_gpus_per_engine, "CPU": 1} if on_gpu else {"CPU": 1}
    group = ray.util.placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    fleet = RayFleet([], group, [])
    if not ready:
        fleet.stop()
        have = {key: ray.cluster_resources().get(key, 0) for key in bundle}
        raise MilesError(f"Ray cannot place {count} rollout servers of {bundle} each within "
                         f"{PLACEMENT_TIMEOUT_S:.0f} s beside the trainer ranks: the cluster has {have}")
    return fleet, group, bundle.get("GPU", 0)


def _colocated_group(cfg: EngineConfig, count: int, on_gpu: bool) -> tuple[RayFleet, object, float]:
    """The run's own placement group (not the fleet's to remove): server i in rank i's bundle,
    with the share of its GPU the rank left."""
    import ray

    if cfg.num_gpus_per_engine != 1:
        raise MilesError(f"engine.colocate under --ray puts each rollout server on one trainer rank's GPU: "
                         f"engine.num_gpus_per_engine must be 1, got {cfg.num_gpus_per_engine}")
    group = ray.util.get_current_placement_group() if ray.is_initialized() else None  # it would start a Ray
    if group is None or len(group.bundle_specs) < count:
        raise MilesError(f"engine.colocate under --ray: {count} rollout servers need the bundles of as many "
                         "trainer ranks, and this process is not a trainer rank placed by `miles train --ray`")
    return RayFleet([], None, []), group, (1 - COLOCATED_GPU_SHARE) if on_gpu else 0
