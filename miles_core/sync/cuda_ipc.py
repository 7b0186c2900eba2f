"""CUDA IPC weight sync (`sync.transport = "cuda_ipc"`): a `miles serve` engine on the same GPU
(colocated) maps the trainer's memory and copies its weights out of it, with no host copy.

Two ways, chosen per push:

- **direct** (the trainer's weights lie in the same storages as in the push before: the native
  trainer's parameters): one POST `/update_weights_from_tensor` (`load_format = "miles_cuda_ipc"`)
  names every weight where it lies (its storage's CUDA IPC handle fields and its byte offset;
  `ipc_format`). The server maps each storage once and copies every weight into the engine in
  one multi-tensor copy: one pass over the bytes, one call a push, whatever the size.
- **staged** (the first push, and weights made afresh for each push: gathered FSDP shards,
  quantised copies): per bucket (`sync.bucket_mb`) the tensors are copied into one reused CUDA
  buffer, each 256-byte aligned (`flat.FlatStaging`), which the server maps once and copies out
  of; the trainer waits until every server has copied a bucket out, then packs the next.

Whether a storage is the same is known without holding it: a weak reference to each storage of
the last push (torch keeps one Python object per live storage) is alive and the same object only
if that memory was not freed since. A storage is exported once (each export takes one of torch's
IPC ref counters and events) and its description built once per (names, layout). The very
`KeptWeights` tuple of the push before (the native trainer's export) is taken without looking at
any of its weights again; other weights, named and laid out (address, dtype, shape) as the last
direct push's, are taken by comparing those (its weights are held until the next push, so no
other storage can lie at their addresses).

A description the servers have travels again as its sha256 (`ipc_format.reference`). A push of
one call (direct, or one bucket) asks the server to abort what runs and hold new
requests while it updates (SGLang's `abort_all_requests`); a push of several buckets pauses the
servers around them instead, so no request ever sees half-updated weights. The last call stamps
the version and flushes the cache.
"""

from __future__ import annotations

import base64
import itertools
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import torch

from miles_core.config import SyncConfig
from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import MilesError, Refused
from miles_core.models.kept_weights import KeptWeights
from miles_core.sync.flat import FlatStaging, signature
from miles_core.sync.ipc_format import ALIGN, LOAD_FORMAT, IpcTensor, describe, reference
from miles_core.sync.ipc_mapping import device_uuid
from miles_core.sync.nccl import require_weight_routes
from miles_core.sync.protocol import Named, SyncContext, SyncStats, send_paused



def export_storage(tensor: torch.Tensor) -> dict:
    """The handle fields of the whole storage under a CUDA tensor, from torch's own IPC reduction."""
    from torch.multiprocessing.reductions import reduce_tensor

    whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(tensor.untyped_storage())
    _, args = reduce_tensor(whole)
    (_, size, _, offset, _, _, device, handle, storage_size, storage_offset, _, ref_handle, ref_offset,
     event_handle, event_sync) = args
    return {"device_index": int(device), "handle": handle, "storage_size_bytes": int(storage_size),
            "storage_offset_bytes": int(storage_offset), "ref_counter_handle": ref_handle,
            "ref_counter_offset": int(ref_offset), "event_handle": event_handle,
            "event_sync_required": bool(event_sync), "buffer_offset": int(offset), "buffer_bytes": int(size[0])}


class StorageExports:
    """Storages by address, each with a weak reference (alive and the same object only while that
    memory is not freed), its device and, once exported, its handle fields."""

    def __init__(self, device_type: str = "cuda") -> None:
        self.device_type = device_type
        """Where shareable tensors lie (CUDA; CPU in tests, with the export faked)."""
        self._known: dict[int, tuple[weakref.ref, torch.device, dict | None]] = {}
        self._devices: dict[torch.device, torch.device] = {}

    def device_of(self, tensor: torch.Tensor) -> torch.device | None:
        """The device of `tensor` if it lies, contiguous, in a storage seen before that is still
        the same (None otherwise). Called per weight per push: only the storage is looked at (a
        storage stays on its device), no `tensor.device`; the devices are interned, so one device
        is one object."""
        if not tensor.is_contiguous():
            return None
        storage = tensor.untyped_storage()
        entry = self._known.get(storage.data_ptr())  # `_entry`, inlined: one call less per weight
        return entry[1] if entry is not None and entry[0]() is storage else None

    def knows(self, tensor: torch.Tensor) -> bool:
        return self.device_of(tensor) is not None

    def note(self, tensor: torch.Tensor, noted: dict) -> None:
        """Add `tensor`'s storage to `noted` (a weak reference, or the entry kept for it)."""
        device = self._devices.setdefault(tensor.device, tensor.device)
        if device.type == self.device_type:
            storage = tensor.untyped_storage()
            noted[storage.data_ptr()] = self._entry(storage) or (weakref.ref(storage), device, None)

    def _entry(self, storage) -> tuple[weakref.ref, torch.device, dict | None] | None:
        """The entry of `storage` if it is the one seen at its address (None otherwise)."""
        entry = self._known.get(storage.data_ptr())
        return entry if entry is not None and entry[0]() is storage else None

    def remember(self, noted: dict) -> None:
        """Know the storages `note` collected, and no others."""
        self._known = noted

    def fields(self, tensor: torch.Tensor) -> dict:
        """The handle fields of a known tensor's storage (exported on first use)."""
        key = tensor.untyped_storage().data_ptr()
        ref, device, fields = self._known[key]
        if fields is None:
            fields = export_storage(tensor)
            self._known[key] = (ref, device, fields)
        return fields


class IpcDescriptions:
    """The trainer's end: each description's JSON, built once per (names, layout, storages): the
    last `MAX_DESCRIPTIONS` staged ones, the last direct one."""

    MAX_DESCRIPTIONS = 64

    def __init__(self, exports: StorageExports | None = None) -> None:
        self.exports = exports or StorageExports()
        self._staging: tuple[torch.Tensor, dict] | None = None
        """(staging buffer, its handle fields): exported once per buffer."""
        self._texts: OrderedDict[tuple, str] = OrderedDict()
        self._last_direct: tuple[list[tuple], str] | None = None
        self.num_exports = 0

    def staged(self, buffer: torch.Tensor, names: list[str], tensors: list[torch.Tensor], offsets: list[int]) -> str:
        """The description of `tensors` (called `names`) at `offsets` of the staging `buffer`."""
        if self._staging is None or self._staging[0] is not buffer:
            self._staging = (buffer, export_storage(buffer))
            self._texts.clear()
            self.num_exports += 1
        key = ("staged", tuple(names), signature(tensors), tuple(offsets))
        return self._text(key, buffer.device, lambda: ([self._staging[1]], [
            IpcTensor(name, t.dtype, tuple(t.shape), offset) for name, t, offset in zip(names, tensors, offsets)]))

    def direct(self, named: list[Named], layout: list[tuple] | None = None) -> str:
        """The description of tensors the exports know, each where it lies in its storage;
        `layout`: their (name, address, dtype, shape), if the caller has it. A trainer pushes its
        weights in one layout, so only the last description is kept, known again by comparing
        layouts."""
        layout = layout if layout is not None else [(n, t.data_ptr(), t.dtype, t.shape) for n, t in named]
        last = self._last_direct
        if last is not None and last[0] == layout:
            return last[1]
        storages, tensors = self._direct(named)
        text = describe(storages, device_uuid(named[0][1].device), tensors)
        self._last_direct = (layout, text)
        return text

    def forget_direct(self) -> None:
        """Drop the direct description: it names storages by address, and one may be new."""
        self._last_direct = None

    def _direct(self, named: list[Named]) -> tuple[list[dict], list[IpcTensor]]:
        storages, index, tensors = [], {}, []
        for name, tensor in named:
            storage = tensor.untyped_storage().data_ptr()
            if storage not in index:
                index[storage] = len(storages)
                storages.append(self.exports.fields(tensor))
                self.num_exports += 1
            offset = tensor.data_ptr() - storage
            tensors.append(IpcTensor(name, tensor.dtype, tuple(tensor.shape), offset, index[storage]))
        return storages, tensors

    def _text(self, key: tuple, device: torch.device, build) -> str:
        text = self._texts.get(key)
        if text is None:
            storages, tensors = build()
            text = self._texts[key] = describe(storages, device_uuid(device), tensors)
            if len(self._texts) > self.MAX_DESCRIPTIONS:
                self._texts.popitem(last=False)
        else:
            self._texts.move_to_end(key)
        return text


class CudaIpcSync:
    """`WeightSync` to `miles serve` engines on this GPU: the trainer's weights where they lie, or
    bucket by bucket through one shared buffer."""

    def __init__(self, engine: RolloutEngine, cfg: SyncConfig, context: SyncContext | None = None) -> None:
        require_weight_routes(engine, "cuda_ipc")
        if not torch.cuda.is_available():
            raise MilesError("sync.transport = 'cuda_ipc' needs CUDA (the trainer and the engine on one GPU); "
                             "use 'nccl' or 'disk'")
        self.engine, self.cfg = engine, cfg
        self.bucket_bytes = cfg.bucket_mb << 20
        self.staging: FlatStaging | None = None
        self.descriptions = IpcDescriptions()
        self.num_direct = 0
        """Pushes that went direct (the rest were staged)."""
        self._delivered: OrderedDict[str, str] = OrderedDict()
        """Descriptions the servers have, and the reference that stands for each."""
        self._direct_bytes: tuple[str | None, int] = (None, 0)
        self._events: dict[str, torch.cuda.Event] = {}
        """The servers' copied events, opened once each."""
        self._last_taken: tuple[KeptWeights | None, list[Named], list[tuple]] | None = None
        """What the last push that found every weight known took, and its `KeptWeights` if it was one."""

    @property
    def buffer(self) -> torch.Tensor | None:
        return None if self.staging is None else self.staging.buffer

    def push(self, weights: Iterable[Named], version: str) -> SyncStats:
        return self.push_within(weights, version, lambda fn: fn())

    def push_within(self, weights: Iterable[Named], version: str, run: Callable[[Callable], tuple]) -> SyncStats:
        """`push`, where a direct push over open local channels runs on this thread (its one wait,
        the answer, is bounded by `sync.timeout_s`) and anything else through `run` (`TimedSync`:
        on its thread, under its deadline), saving a direct push two thread hand-offs."""
        start = time.perf_counter()
        known, layout, rest = self._take(weights)
        if rest is None and known and getattr(self.engine, "weight_channels_open", bool)():
            counts = self._send_direct(known, layout, version)
        else:
            counts = run(lambda: self._push_slowly(known, layout, rest, version))
        return SyncStats(*counts, time.perf_counter() - start)

    def _push_slowly(self, known: list[Named], layout: list[tuple], rest: Iterator[Named] | None,
                     version: str) -> tuple[int, int, int]:
        """A direct push that opens the channels first, or a staged one."""
        if rest is None and known:
            return self._send_direct(known, layout, version)
        noted: dict = {}
        self._last_taken = None  # the storages known change
        counts = send_paused(self.engine, self._noting(known, rest or iter(()), noted), self.bucket_bytes,
                             lambda bucket, last, alone: self._send_staged(bucket, version if last else None, alone))
        self.descriptions.exports.remember(noted)  # the next push goes direct if they stay where they are
        self.descriptions.forget_direct()  # a storage at a known address may be a new one
        return counts

    def _take(self, weights: Iterable[Named]) -> tuple[list[Named], list[tuple], Iterator[Named] | None]:
        """`_take_known`, with two shortcuts past the storage checks. The very `KeptWeights`
        whose weights all lay where the push before found them: what it took then. Weights
        named and laid out (address, dtype, shape) as the last direct push's: those, since the
        last push's weights are held until the next (their views keep the storages alive), no
        other storage can lie at those addresses."""
        last = self._last_taken
        if last is not None and last[0] is weights:
            return last[1], last[2], None
        if last is not None:
            known, layout, rest = self._take_as_before(iter(weights), last[2])
        else:
            known, layout, rest = self._take_known(iter(weights))
        taken = rest is None and bool(known)
        self._last_taken = (weights if isinstance(weights, KeptWeights) else None, known, layout) if taken else None
        return known, layout, rest

    def _take_as_before(self, weights: Iterator[Named], layout: list[tuple]
                        ) -> tuple[list[Named], list[tuple], Iterator[Named] | None]:
        """The weights if they are named and laid out as `layout` (and contiguous), else
        `_take_known` of them: three attributes a weight compared, not its storage looked up
        (~0.6x the host time). Weights made afresh (gathered, quantised) differ at the first."""
        taken = []
        for (name, address, dtype, shape), item in zip(layout, weights):  # `layout` first: an extra weight is not lost
            tensor = item[1]
            if (item[0] != name or tensor.data_ptr() != address or tensor.dtype is not dtype
                    or tensor.shape != shape or not tensor.is_contiguous()):
                return self._take_known(itertools.chain(taken, [item], weights))
            taken.append(item)
        extra = next(weights, None)
        if extra is not None or len(taken) != len(layout):
            return self._take_known(itertools.chain(taken, [extra] if extra is not None else [], weights))
        return taken, layout, None

    def _take_known(self, weights: Iterator[Named]) -> tuple[list[Named], list[tuple], Iterator[Named] | None]:
        """The weights while every one lies where the last push found it, on one device, with their
        layout (name, address, dtype, shape); and the rest from the first that does not (None
        when all do). One pass: at 0.6B it is ~300 weights, each push."""
        known, layout, device_of, device = [], [], self.descriptions.exports.device_of, None
        for item in weights:
            name, tensor = item
            found = device_of(tensor)
            if found is None or (found is not device and device is not None):
                return known, layout, itertools.chain([item], weights)
            device = found
            known.append(item)
            layout.append((name, tensor.data_ptr(), tensor.dtype, tensor.shape))
        return known, layout, None

    def _noting(self, known: list[Named], rest: Iterator[Named], noted: dict) -> Iterator[Named]:
        """`known` then `rest`, noting each storage (weakly: a gathered tensor is freed with its bucket)."""
        for name, tensor in itertools.chain(known, rest):
            self.descriptions.exports.note(tensor, noted)
            yield name, tensor

    def _send_direct(self, named: list[Named], layout: list[tuple], version: str) -> tuple[int, int, int]:
        text = self.descriptions.direct(named, layout)
        device = named[0][1].device
        torch.cuda.synchronize(device)  # the server reads them from its own stream
        self._update(text, device, version=version, flush=True, abort_all=True)  # one call: it holds requests
        self.num_direct += 1
        if self._direct_bytes[0] is not text:
            self._direct_bytes = (text, sum(t.nbytes for _, t in named))
        return len(named), 1, self._direct_bytes[1]

    def _send_staged(self, bucket: list[Named], version: str | None, alone: bool) -> None:
        device = next((t.device for _, t in bucket if t.is_cuda), torch.device("cuda", torch.cuda.current_device()))
        if self.staging is None:
            self.staging = FlatStaging(device, align=ALIGN, min_bytes=self.bucket_bytes)
        self.staging.move_to(device)
        tensors = [t for _, t in bucket]
        _, offsets = self.staging.pack_with_offsets(tensors)
        torch.cuda.synchronize(device)  # the server reads the buffer from its own stream
        text = self.descriptions.staged(self.staging.buffer, [name for name, _ in bucket], tensors, offsets)
        # `_update` returns once every server has copied the bucket out: the next pack may follow
        self._update(text, device, version=version, flush=version is not None, abort_all=alone)

    def _update(self, text: str, device: torch.device, **options) -> None:
        """Send the description over each server's local weight channel (HTTP where it has none),
        as its reference once the servers have it (a server that lost it answers 409: then the
        whole text, which every server applies alike); then wait for the servers' copies (an
        answer over HTTP comes after them)."""
        timeout = self.cfg.timeout_s or None
        sent = self._delivered.get(text)
        answers = None
        if sent is not None:
            try:
                answers = self.engine.update_weights_from_tensor([sent], load_format=LOAD_FORMAT, local=True,
                                                                 timeout_s=timeout, **options)
                self._delivered.move_to_end(text)
            except Refused as err:
                if err.status != 409:
                    raise
        if answers is None:
            answers = self.engine.update_weights_from_tensor([text], load_format=LOAD_FORMAT, local=True,
                                                             timeout_s=timeout, **options)
            self._delivered[text] = reference(text)
            if len(self._delivered) > IpcDescriptions.MAX_DESCRIPTIONS:
                self._delivered.popitem(last=False)
        self._wait_copied(answers, device)

    def _wait_copied(self, answers: list[dict], device: torch.device) -> None:
        """Wait on the host, at most `sync.timeout_s`, for each server's `copied_event`: the push
        returns once every server has copied the weights out, so the trainer may write them (or
        the next bucket into the staging buffer) at once. Not this process's stream waiting on
        the event: that costs the GPU a switch between the two processes' contexts, ~0.25 ms of a
        0.6B push on an H200 (`bench/results/weight_sync.md`, probes before run 18)."""
        limit = self.cfg.timeout_s
        deadline = time.monotonic() + limit if limit > 0 else math.inf
        for answer in answers:
            handle = answer.get("copied_event") if isinstance(answer, dict) else None
            if not handle:
                continue
            event = self._copied_event(handle, device)
            while not event.query():  # a few microseconds a poll; the GIL is let go between polls
                if time.monotonic() > deadline:
                    raise MilesError(f"cuda_ipc: a server's copies of the weights did not finish within "
                                     f"sync.timeout_s = {limit:g} s (its GPU is stuck or busy)")
                time.sleep(0)

    def _copied_event(self, handle: str, device: torch.device) -> torch.cuda.Event:
        event = self._events.get(handle)
        if event is None:
            try:
                event = torch.cuda.Event.from_ipc_handle(device, base64.b64decode(handle, validate=True))
            except (ValueError, RuntimeError) as err:
                raise MilesError(f"cuda_ipc: a server answered a copied_event that cannot be opened ({err})") from None
            self._events[handle] = event
        return event
