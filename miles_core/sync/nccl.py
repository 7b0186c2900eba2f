"""NCCL weight sync (`sync.transport = "nccl"`): rank 0 of the trainer broadcasts every tensor to
the rollout servers over a weight-update process group, with SGLang's protocol, so it drives real
SGLang servers as well as `miles serve`.

Once, on the first push: rank 0 hosts the group's store on a free port, asks every server to join
(`/init_weights_update_group`: server i's `rank_offset` is 1 + the ranks of the servers before it,
`world_size` 1 + every server rank) and joins as rank 0 meanwhile (`group.WeightGroup`, apart
from the default process group FSDP uses). Each push, per bucket (`sync.bucket_mb`): send
`/update_weights_from_distributed` (names, dtypes, shapes) to every server, broadcast the bucket,
and wait for every answer (a server answers once it holds the bucket); to `miles serve` servers on
this machine over their local weight channels (no HTTP call, no thread), else over HTTP in a
thread while the bucket is broadcast.
With `sync.nccl_flatten` (the default) a bucket is one broadcast of its bytes packed into a reused
staging buffer (SGLang's `flattened_bucket`); without it, one broadcast per tensor, which every
SGLang release understands; the last bucket stamps the version and flushes the cache. A push of
one bucket is that one call, which aborts the servers' running requests and holds new ones until
it is in (`abort_all_requests`); a push of several pauses the servers around them
(`protocol.send_paused`). A server that refuses a bucket (unknown name, wrong shape) has still
received all of it, so the group stays in step and the next push works; a server that is gone
(found before each push, since no pause call goes first: its local weight channel has ended,
or, without one, a TCP connect to it is refused) fails the push with one
line, and `sync.timeout_s` (`TimedSync`) turns a server that never answers into an error.
Backend `sync.nccl_backend`: `auto` is nccl for CUDA weights, gloo for CPU ones (tests).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterable

import torch

from miles_core.config import SyncConfig
from miles_core.engine.http_weights import Pending
from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import MilesError
from miles_core.sync import flat
from miles_core.sync.group import WeightGroup, dtype_name, host_store, resolve_backend
from miles_core.sync.protocol import SyncContext, SyncStats, send_paused
from miles_core.utils.threads import background

NO_LIMIT_S = 1800.0
"""Collective timeout when `sync.timeout_s` is 0 (no limit on the push as a whole)."""


def require_weight_routes(engine: RolloutEngine, transport: str) -> None:
    if not callable(getattr(engine, "update_weights_from_tensor", None)):
        raise MilesError(f"sync.transport = '{transport}' sends weights to servers in other processes; "
                         f"{type(engine).__name__} is not one (use engine.backend = 'sglang')")


class NcclSync:
    """`WeightSync` that broadcasts the weights from this process (rank 0) to every server."""

    def __init__(self, engine: RolloutEngine, cfg: SyncConfig, context: SyncContext | None = None) -> None:
        require_weight_routes(engine, "nccl")
        self.engine, self.cfg = engine, cfg
        self.group: WeightGroup | None = None
        self.staging: flat.FlatStaging | None = None
        self.device = torch.device("cpu")
        self.timeout_s = cfg.timeout_s or NO_LIMIT_S
        self.bucket_bytes = cfg.bucket_mb << 20

    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncStats:
        start = time.perf_counter()
        weights = iter(weights)
        first = next(weights, None)
        if first is None:
            return SyncStats(0, 0, 0, time.perf_counter() - start)
        if self.group is None:
            self._join(first[1].device)
        self._check_servers()
        counts = send_paused(self.engine, itertools.chain([first], weights), self.bucket_bytes,
                             lambda bucket, last, alone: self._send(bucket, version if last else None, alone))
        return SyncStats(*counts, time.perf_counter() - start)

    def close(self) -> None:
        """Every server leaves the group while this rank does: NCCL's finalize waits for every rank,
        so asking the servers first and waiting for their answer before leaving would deadlock."""
        if self.group is None:
            return
        servers = background(self.engine.destroy_weights_update_group, group_name=self.group.name)
        try:
            self.group.destroy()
        finally:
            self.group = None
        try:
            servers.result(timeout=self.timeout_s)
        except Exception:  # noqa: BLE001 - a server that is gone has no group left; closing must not hide the run's error
            pass

    # -- steps -------------------------------------------------------------------------------
    def _join(self, device: torch.device) -> None:
        backend = resolve_backend(self.cfg.nccl_backend, device)
        self.device = device if backend == "nccl" else torch.device("cpu")
        self.staging = flat.FlatStaging(self.device) if self.cfg.nccl_flatten else None
        world_size = 1 + sum(self.engine.weight_ranks())
        store = host_store(0, world_size, self.timeout_s)
        address = self.cfg.nccl_master_address or self.engine.local_address()
        name = f"miles-{uuid.uuid4().hex[:12]}"
        servers = background(self.engine.init_weights_update_group, master_address=address, master_port=store.port,
                             world_size=world_size, group_name=name, backend=backend)
        joined = background(WeightGroup, master_address="", master_port=store.port, rank=0, world_size=world_size,
                            group_name=name, backend=backend, timeout_s=self.timeout_s, store=store)
        while not joined.done():  # a server that refuses to join fails this at once, not at the timeout
            if servers.done() and servers.exception() is not None:
                raise servers.exception()
            time.sleep(0.01)
        self.group = joined.result()
        servers.result()
        self._members = [s for s in self.engine.servers if s.alive]

    def _check_servers(self) -> None:
        """Every server of the group still runs: a push without a pause call would otherwise
        broadcast to a rank that is gone and wait for it until the timeout."""
        gone = [s.url for s in self._members if not s.alive or not self.engine.listening(s)]
        if gone:
            raise MilesError(f"sync.transport = 'nccl': server {gone[0]} has left; the weight-update group "
                             "needs every server it was built with (restart the run)")

    def _send(self, bucket: list[tuple[str, torch.Tensor]], version: str | None, alone: bool) -> None:
        tensors = [t for _, t in bucket]
        body = dict(names=[n for n, _ in bucket], dtypes=[dtype_name(t.dtype) for t in tensors],
                    shapes=[list(t.shape) for t in tensors], group_name=self.group.name, version=version,
                    flush=version is not None, load_format=flat.LOAD_FORMAT if self.staging else None,
                    abort_all=alone)
        # Packed before the servers are asked: each waits in the broadcast as soon as it reads the request.
        outgoing = [self.staging.pack(tensors)] if self.staging else [
            t.detach().to(self.device).contiguous() for t in tensors]
        answers = self.engine.update_weights_from_distributed(**body, local=True, timeout_s=self.cfg.timeout_s or None)
        try:
            for tensor in outgoing:
                self.group.broadcast(tensor)
        except Exception as err:  # noqa: BLE001 - gloo/NCCL errors: one line, with what the servers said
            raise MilesError(f"weight broadcast to the servers failed: {_error_of(answers) or err}") from None
        answers.result()


def _error_of(future: Pending) -> str:
    """The error a finished call raised, waiting briefly for it (a refusal explains a failed broadcast)."""
    try:
        future.result(timeout=5)
    except Exception as err:  # noqa: BLE001
        return str(err)
    return ""
