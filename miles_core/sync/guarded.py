"""Weight sync that is never silent: a deadline instead of a hang (`sync.timeout_s`), and, with
`sync.check_weight_update_equal` (slime's `--check-weight-update-equal`), a bitwise check that
the engine holds exactly what was sent.

The deadline runs the transport on a worker thread (one, kept across pushes) and waits for it; a
push that has not finished in time is an error naming the version and the limit (the stuck thread
is left behind: the run stops). A transport with `push_within` runs on the caller's thread what
it bounds itself (`cuda_ipc`: a direct push's answer and copies; `inprocess`: the native engine's
wait for its running step) and hands the rest to the worker thread: two thread hand-offs were a
fifth of a 0.6B in-process push. The check reads every tensor back from the engine
(`get_weights_by_name`, SGLang's name for it) after the push and compares it with the tensor the
transport was handed, cast to the engine's dtype as the engine's own copy casts it; it also
checks the version stamp. For engines in
other processes (`miles serve` servers) only digests travel: every server answers a sha256 per
tensor (`/weights_checksum`), compared with the digest of the trainer's tensor in the server's
dtype, so `nccl`, `cuda_ipc` and `disk` pushes are verified bitwise too.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import MilesError
from miles_core.sync.group import parse_dtype, tensor_sha256
from miles_core.sync.protocol import SyncStats, WeightSync


class TimedSync:
    """`WeightSync` whose `push` fails after `timeout_s` seconds instead of hanging."""

    def __init__(self, inner: WeightSync, timeout_s: float) -> None:
        self.inner, self.timeout_s = inner, timeout_s
        self._worker: _Worker | None = None

    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncStats:
        push_within = getattr(self.inner, "push_within", None)
        if push_within is not None:  # it bounds its own waits where it can and hands us the rest
            return push_within(weights, version, lambda fn: self._within(fn, version))
        return self._within(lambda: self.inner.push(weights, version), version)

    def _within(self, fn: Callable[[], Any], version: str) -> Any:
        """`fn()` on the worker thread, or the error once `timeout_s` has passed."""
        if self._worker is None:
            self._worker = _Worker()
        try:
            return self._worker.submit(fn).result(self.timeout_s)
        except FutureTimeout:
            self._worker = None  # stuck: left behind; a later push gets a fresh thread
            raise MilesError(f"weight sync of version {version} did not finish within sync.timeout_s = "
                             f"{self.timeout_s:g} s; the engine did not take the weights (stuck or unreachable)"
                             ) from None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        close_inner(self.inner)


class _Worker:
    """One daemon thread that runs pushes: starting a thread for every push cost ~0.15 ms of a
    push's host time (a 0.6B in-process push is ~2 ms). Daemon, so a stuck push never holds up the
    interpreter's exit."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="weight-sync", daemon=True).start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        """`fn()` queued for the thread; the future holds its result or its exception."""
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def stop(self) -> None:
        self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as err:  # raised in the caller's thread by `Future.result`
                future.set_exception(err)


class CheckedSync:
    """`WeightSync` that verifies the engine's weights bitwise after every push."""

    def __init__(self, inner: WeightSync, engine: RolloutEngine) -> None:
        self.remote = callable(getattr(engine, "weights_checksums", None))
        if not self.remote and not callable(getattr(engine, "get_weights_by_name", None)):
            raise MilesError(f"sync.check_weight_update_equal needs an engine that reports its weights; "
                             f"{type(engine).__name__} does not (use engine.backend = 'native')")
        self.inner, self.engine = inner, engine

    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncStats:
        sent: dict[str, torch.Tensor] = {}
        stats = self.inner.push(_recorded(weights, sent), version)
        if self.engine.weight_version != str(version):
            raise MilesError(f"weight sync: the engine reports version '{self.engine.weight_version}' after "
                             f"the update to '{version}'")
        if self.remote:
            self._check_digests(sent, version)
            return stats
        for name, tensor in sent.items():
            held = self.engine.get_weights_by_name(name).detach().cpu()
            expected = tensor.to(held.dtype)
            if held.shape != expected.shape or not torch.equal(held, expected):
                diff = (held.double() - expected.double()).abs().max().item() if held.shape == expected.shape else None
                raise MilesError(f"weight sync of version {version}: the engine's '{name}' differs from the "
                                 f"trainer's (max abs diff {diff}); sync.check_weight_update_equal")
        return stats

    def _check_digests(self, sent: dict[str, torch.Tensor], version: str) -> None:
        for url, held in self.engine.weights_checksums(list(sent)):
            for name, tensor in sent.items():
                entry = held[name]
                expected = tensor.to(parse_dtype(entry["dtype"], f"{url} tensor '{name}'"))
                if list(expected.shape) != entry["shape"] or tensor_sha256(expected) != entry["sha256"]:
                    raise MilesError(f"weight sync of version {version}: {url} holds a '{name}' that differs from "
                                     f"the trainer's (sha256 or shape {entry['shape']}); "
                                     "sync.check_weight_update_equal")

    def close(self) -> None:
        close_inner(self.inner)


def close_inner(inner: WeightSync) -> None:
    """Close a wrapped transport that holds resources (the `nccl` group)."""
    close = getattr(inner, "close", None)
    if callable(close):
        close()


def _recorded(weights: Iterable[tuple[str, torch.Tensor]], sent: dict[str, torch.Tensor]) -> Iterator:
    """Pass the tensors through, keeping a CPU copy of each."""
    for name, tensor in weights:
        sent[name] = tensor.detach().cpu().clone()
        yield name, tensor
