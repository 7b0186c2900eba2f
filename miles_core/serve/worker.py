"""The serving worker: concurrent HTTP requests in, batched engine work out.

Continuous batching (an engine with `submit_all` and its own loop: the native engine): the engine
is started in a background loop that schedules continuously, and `generate` submits each request
to it directly. Requests join the running batch at the next step and each is answered when its
own sequences finish (SGLang's behaviour; a static batch would make a late request wait for the
whole batch); an abort answers a running request with its tokens so far, and a request waiting
while the server is paused with none. `stream` does the same and yields the tokens as they are
sampled. A request whose client goes away (closed stream, cancelled task, disconnected client) is
aborted in the engine, freeing its KV blocks.

Batches (an engine with only `generate`: the HTTP client engine): route handlers put a job (a list
of `GenerateRequest`s) in a queue; the worker thread takes the first waiting job, keeps collecting
jobs for `window_s` (or until `max_batch_size` sequences are gathered), runs them through a single
`engine.generate` call and hands each job its slice of the results. An aborted job still waiting
is dropped; one whose batch already runs is answered at once as aborted (its result discarded).

Control operations (weight updates, flush, memory) run on the worker thread, between batches; with
continuous batching they also take the engine's step lock, so they fall between two steps. The
local weight channel runs its updates on its own thread under the same lock (`control_here`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from miles_core.engine.protocol import GenerateRequest, Generation, RolloutEngine
from miles_core.serve.stream_updates import StreamUpdate, stream_updates


class Aborted(Exception):
    """The job was aborted (by rid, by a disconnected client, or by shutdown) before it ran."""


@dataclass
class _Job:
    requests: list[GenerateRequest]
    future: Future
    num_sequences: int = 0
    aborted: bool = False

    def __post_init__(self) -> None:
        self.num_sequences = sum(r.sampling.n_samples_per_prompt for r in self.requests)


@dataclass
class _Control:
    fn: Callable[[], Any]
    future: Future


@dataclass
class WorkerStats:
    num_batches: int = 0
    num_jobs: int = 0
    num_sequences: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    """Sequences of each `generate` batch (engines without their own loop)."""
    max_concurrent: int = 0
    """Most sequences in flight at once through continuous batching (engines with their own loop)."""

    def record_concurrency(self, num_sequences: int) -> None:
        self.max_concurrent = max(self.max_concurrent, num_sequences)


class BatchingWorker:
    """One thread that owns the engine and batches concurrent jobs into `generate` calls."""

    def __init__(self, engine: RolloutEngine, *, max_batch_size: int, window_s: float = 0.005,
                 poll_s: float = 0.005) -> None:
        self.engine, self.max_batch_size, self.window_s = engine, max_batch_size, window_s
        self.poll_s = poll_s
        # Token streaming needs the engine to step on its own while the worker waits on a batch.
        self.streaming = all(callable(getattr(engine, name, None)) for name in ("submit", "submit_all", "start"))
        if self.streaming:
            engine.start()
        self._streams: list[Any] = []  # handles of running streams (for abort by rid / all)
        self.stats = WorkerStats()
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[_Job] = []
        self._running: list[_Job] = []
        self._waiting: list[_Job] = []
        """Requests of the continuous path waiting for the server to be resumed (abortable)."""
        self._lock = threading.Lock()
        self._control_lock = threading.Lock()
        """Held while a control item or a batch runs (`control_here` runs beside the thread)."""
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="miles-serve-worker", daemon=True)
        self._thread.start()

    # -- called from route handlers ----------------------------------------------------------
    async def generate(self, requests: list[GenerateRequest]) -> list[list[Generation]]:
        """Answer `requests` (one list of n generations each); raises `Aborted` if aborted first."""
        if self.streaming:
            return await self._generate_continuously(requests)
        job = _Job(list(requests), Future())
        with self._lock:
            self._pending.append(job)
        self._queue.put(None)  # wake the loop
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:  # the client went away: free its place in the queue
            self._abort_jobs(lambda j: j is job)
            raise

    async def control(self, fn: Callable[[], Any], *, alone: bool = False) -> Any:
        """Run `fn` on the worker thread between batches (weight updates, flush). `alone`: with
        every running request aborted and new ones held until it is done (SGLang's
        `abort_all_requests` on a weight update: one call does what pause -> update -> continue
        do, and no request sees both the old and the new weights)."""
        with self._held(alone):
            return await asyncio.wrap_future(self._queued(fn))

    def control_here(self, fn: Callable[[], Any], *, alone: bool = False) -> Any:
        """`control` run on the caller's own thread (the local weight channel's), under the lock every
        control item and batch of the worker runs under: between batches as `control` is, without
        the two thread hand-offs (with the pause around them ~0.13 ms of a 0.6B push on a GPU host,
        `bench/results/weight_sync.md` run 14)."""
        with self._held(alone), self._control_lock:
            return fn()

    def _queued(self, fn: Callable[[], Any]) -> Future:
        item = _Control(fn, Future())
        self._queue.put(item)
        return item.future

    @contextmanager
    def _held(self, alone: bool) -> Iterator[None]:
        """With `alone`: running requests aborted and new ones held meanwhile (a server the
        trainer paused before stays paused)."""
        paused_before = self.paused
        if alone:
            self.pause()
            self.abort(abort_all=True)
        try:
            yield
        finally:
            if alone and not paused_before:
                self.resume()

    async def _generate_continuously(self, requests: list[GenerateRequest]) -> list[list[Generation]]:
        """Continuous batching: the requests join the engine's running batch at its next step and
        each is answered when its own sequences finish, as SGLang answers; an abort answers a
        running request with the tokens it has so far (`finish_reason` abort)."""
        if self.paused:  # a paused server starts nothing new; a waiting request can still be aborted
            await self._wait_unpaused(_Job(list(requests), Future()))
        loop = asyncio.get_running_loop()
        handles = self.engine.submit_all(requests)  # all checked first; they join the same step
        futures = []
        for handle in handles:
            future = loop.create_future()
            handle.add_done_callback(lambda h, f=future: loop.call_soon_threadsafe(_settle_once, f, h))
            futures.append(future)
        with self._lock:
            self._streams += handles
            self.stats.record_concurrency(sum(len(h.sequences) for h in self._streams if not h.done))
        try:
            return [h.result() for h in await asyncio.gather(*futures)]
        finally:
            with self._lock:
                self._streams = [h for h in self._streams if all(h is not mine for mine in handles)]
            for handle in handles:  # the client went away (cancelled): free the engine's blocks
                if not handle.done:
                    self.engine.abort(handle.request.rid)

    async def _wait_unpaused(self, job: _Job) -> None:
        with self._lock:
            self._waiting.append(job)
        try:
            while self.paused and not self._stop and not job.aborted:
                await asyncio.sleep(self.poll_s)
        finally:
            with self._lock:
                self._waiting = [j for j in self._waiting if j is not job]
        if job.aborted:
            raise Aborted("aborted")

    def abort(self, rid: str = "", abort_all: bool = False) -> int:
        """Abort jobs and streams holding a request with this rid (or all); returns how many."""
        with self._lock:
            streams = [h for h in self._streams if abort_all or h.request.rid == rid]
        for handle in streams:
            self.engine.abort(handle.request.rid)
        return len(streams) + self._abort_jobs(lambda j: abort_all or any(r.rid == rid for r in j.requests))

    async def stream(self, requests: list[GenerateRequest],
                     is_disconnected: Callable[[], Awaitable[bool]] | None = None
                     ) -> AsyncIterator[list[StreamUpdate]]:
        """Yield the sequences that moved since the last yield, until every request has finished.

        Only for engines with `submit` (`self.streaming`). The engine has no per-token callback, so
        the handles are polled every `poll_s`: a token read a few ms late costs nothing next to a
        forward. Leaving early (consumer gone, `is_disconnected()` true) aborts the unfinished
        requests so the engine frees their KV blocks at once.
        """
        while self.paused and not self._stop:  # a paused server starts nothing new
            await asyncio.sleep(self.poll_s)
        handles = []
        try:
            handles = self.engine.submit_all(requests)  # all checked first; they join the same step
            with self._lock:
                self._streams += handles
            sent: dict[int, int] = {}  # flat index -> output ids already reported (-1: final sent)
            while True:
                updates = stream_updates(handles, sent)
                if updates:
                    yield updates
                if all(h.done for h in handles):
                    return
                if is_disconnected is not None and await is_disconnected():
                    return
                await asyncio.sleep(self.poll_s)
        finally:
            with self._lock:
                self._streams = [h for h in self._streams if all(h is not mine for mine in handles)]
            for handle in handles:
                if not handle.done:
                    self.engine.abort(handle.request.rid)

    def pause(self) -> None:
        """Stop starting new batches (requests wait); control operations still run."""
        self._unpaused.clear()
        self._queue.put(None)  # wake the loop

    def resume(self) -> None:
        self._unpaused.set()
        self._queue.put(None)  # wake the loop: jobs may be waiting

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    def close(self) -> None:
        self._stop = True
        self._unpaused.set()
        self._queue.put(None)
        self._thread.join(timeout=30)
        self.abort(abort_all=True)
        if self.streaming:
            self.engine.stop()

    # -- the worker thread -------------------------------------------------------------------
    def _abort_jobs(self, match: Callable[[_Job], bool]) -> int:
        """Answer matching jobs `Aborted` (no tokens). A running request of the continuous path is
        not a job: `abort` stops it in the engine, which answers it with its tokens so far."""
        with self._lock:
            jobs = [j for j in self._pending + self._running + self._waiting if match(j) and not j.aborted]
            for job in jobs:
                job.aborted = True
        for job in jobs:
            _resolve(job.future, error=Aborted("aborted"))
        return len(jobs)

    def _loop(self) -> None:
        while not self._stop:
            # paused with jobs waiting: sleep until something is queued (resume wakes it), not spin
            self._drain(block=not self._pending_jobs() or not self._unpaused.is_set())
            if self._stop:
                break
            if not self._pending_jobs() or not self._unpaused.is_set():
                continue
            if self.window_s > 0:
                self._collect_window()
            self._run_batch(self._take_batch())

    def _pending_jobs(self) -> list[_Job]:
        with self._lock:
            self._pending = [j for j in self._pending if not j.aborted]
            return list(self._pending)

    def _drain(self, *, block: bool, timeout: float | None = None) -> None:
        """Move queued items into the pending list; run control items right away."""
        try:
            item = self._queue.get(block=block, timeout=timeout)
        except queue.Empty:
            return
        while True:
            if isinstance(item, _Control):
                with self._control_lock:
                    _settle(item.future, item.fn)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def _collect_window(self) -> None:
        deadline = time.monotonic() + self.window_s
        while sum(j.num_sequences for j in self._pending_jobs()) < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._drain(block=True, timeout=left)

    def _take_batch(self) -> list[_Job]:
        """Jobs in arrival order up to `max_batch_size` sequences (at least one job)."""
        with self._lock:
            batch, size = [], 0
            for job in self._pending:
                if batch and size + job.num_sequences > self.max_batch_size:
                    break
                batch.append(job)
                size += job.num_sequences
            self._pending = self._pending[len(batch):]
            self._running = batch
        return batch

    def _run_batch(self, jobs: list[_Job]) -> None:
        try:
            with self._control_lock:
                self._generate(jobs)
        finally:
            with self._lock:
                self._running = []

    def _generate(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if not j.aborted]
        if not jobs:
            return
        requests = [r for job in jobs for r in job.requests]
        try:
            outputs = self.engine.generate(requests)
        except Exception as err:  # noqa: BLE001 - one bad job must not fail its neighbours
            if len(jobs) == 1:
                _resolve(jobs[0].future, error=err)
            else:
                for job in jobs:
                    self._generate([job])
            return
        self._record(jobs)
        start = 0
        for job in jobs:
            _resolve(job.future, outputs[start:start + len(job.requests)])
            start += len(job.requests)

    def _record(self, jobs: list[_Job]) -> None:
        size = sum(j.num_sequences for j in jobs)
        self.stats.num_batches += 1
        self.stats.num_jobs += len(jobs)
        self.stats.num_sequences += size
        self.stats.batch_sizes.append(size)


def _settle_once(future: asyncio.Future, handle: Any) -> None:
    if not future.done():
        future.set_result(handle)


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    try:
        _resolve(future, fn())
    except Exception as err:  # noqa: BLE001 - handed to the awaiting route
        _resolve(future, error=err)


def _resolve(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Settle a future unless an abort (another thread) settled it first."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
