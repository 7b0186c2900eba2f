"""CUDA IPC weight sync (`sync.transport = "cuda_ipc"`): a `miles serve` engine on the same GPU
(colocated) maps the trainer's staging buffer and copies its weights out of it, with no host copy.

Trainer, per bucket (`sync.bucket_mb`): copy the tensors into one contiguous CUDA buffer (each at
a 256-byte aligned byte offset; `flat.FlatStaging`, one multi-tensor copy), and POST
`/update_weights_from_tensor` with `load_format = "miles_cuda_ipc"` and one JSON description in
`serialized_named_tensors`: the buffer's CUDA IPC handle fields (torch's `reduce_tensor`; bytes as
base64), its size and offset, the device's UUID, and per tensor its name, dtype, shape and byte
offset. The buffer stays alive, untouched, until every server answers, then holds the next bucket.
The last bucket stamps the version and flushes the cache. The buffer is exported once (and again
only when it is replaced), so every bucket of every push names the same handle, and a bucket's
description is built once per layout.

Server: `parse_description` checks every field (types, ranges, alignment, the tensors inside the
buffer) before anything is opened; `IpcMapping` rebuilds the buffer only through torch's
`rebuild_cuda_tensor` from those fields, keeps it mapped while descriptions name the same handle
(the mapping, not the views, is what costs: ~2 ms a bucket) and views the tensors in it; the
engine copies them in (checking names and shapes first) and the server synchronises before it
answers. Nothing is ever unpickled: a pickle from the network could run arbitrary code.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from miles_core.config import SyncConfig
from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import MilesError
from miles_core.sync.flat import FlatStaging, signature
from miles_core.sync.group import dtype_name, parse_dtype
from miles_core.sync.nccl import require_weight_routes
from miles_core.sync.protocol import SyncContext, SyncStats, send_buckets
from miles_core.utils.layout import aligned_offsets

LOAD_FORMAT = "miles_cuda_ipc"
ALIGN = 256
"""Byte alignment of each tensor in the buffer (CUDA allocations are 256-aligned; any dtype fits)."""
_BYTES_FIELDS = ("handle", "ref_counter_handle", "event_handle")
_INT_FIELDS = ("device_index", "storage_size_bytes", "storage_offset_bytes", "ref_counter_offset", "buffer_offset",
               "buffer_bytes")


@dataclass(frozen=True)
class IpcTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte offset in the buffer."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class IpcBucket:
    """A parsed, checked description: the shared buffer's handle fields and the tensors in it."""

    device_uuid: str
    fields: dict
    """`reduce_tensor`'s handle fields: ints, bools and bytes (decoded from base64)."""
    tensors: tuple[IpcTensor, ...]


def layout(shapes_dtypes: Iterable[tuple[tuple[int, ...], torch.dtype]]) -> tuple[list[int], int]:
    """Aligned byte offsets of tensors packed in order, and the buffer size they need."""
    return aligned_offsets([IpcTensor("", dtype, tuple(shape), 0).nbytes for shape, dtype in shapes_dtypes], ALIGN)


def describe(handle_fields: dict, device_uuid: str, tensors: list[IpcTensor]) -> str:
    """The JSON a server parses: handle fields (bytes as base64), device, tensors."""
    fields = {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in handle_fields.items()}
    return json.dumps({"format": LOAD_FORMAT, "device_uuid": device_uuid, **fields, "tensors": [
        {"name": t.name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "offset": t.offset} for t in tensors]})


def parse_description(text: str) -> IpcBucket:
    """Check a description field by field; a `MilesError` naming the first bad one otherwise."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, TypeError) as err:
        raise MilesError(f"{LOAD_FORMAT}: the description is not JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != LOAD_FORMAT:
        raise MilesError(f"{LOAD_FORMAT}: expected a JSON object with format '{LOAD_FORMAT}'")
    fields = {name: _int(raw, name) for name in _INT_FIELDS}
    for name in _BYTES_FIELDS:
        fields[name] = _bytes(raw, name)
    if not isinstance(raw.get("event_sync_required"), bool):
        raise MilesError(f"{LOAD_FORMAT}: event_sync_required must be true or false")
    fields["event_sync_required"] = raw["event_sync_required"]
    if not isinstance(raw.get("device_uuid"), str) or not raw["device_uuid"]:
        raise MilesError(f"{LOAD_FORMAT}: device_uuid must be a non-empty string")
    if fields["buffer_offset"] + fields["buffer_bytes"] > fields["storage_size_bytes"]:
        raise MilesError(f"{LOAD_FORMAT}: buffer [{fields['buffer_offset']}, +{fields['buffer_bytes']}) lies outside "
                         f"its storage of {fields['storage_size_bytes']} bytes")
    tensors = _tensors(raw.get("tensors"), fields["buffer_bytes"])
    return IpcBucket(raw["device_uuid"], fields, tensors)


def _int(raw: dict, name: str) -> int:
    value = raw.get(name)
    if type(value) is not int or value < 0:
        raise MilesError(f"{LOAD_FORMAT}: {name} must be an integer >= 0, got {value!r}")
    return value


def _bytes(raw: dict, name: str) -> bytes:
    value = raw.get(name)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise MilesError(f"{LOAD_FORMAT}: {name} must be base64, got {str(value)[:40]!r}") from None


def _tensors(entries, buffer_bytes: int) -> tuple[IpcTensor, ...]:
    if not isinstance(entries, list) or not entries:
        raise MilesError(f"{LOAD_FORMAT}: tensors must be a non-empty list")
    seen, tensors = set(), []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise MilesError(f"{LOAD_FORMAT}: every tensor needs a non-empty name, got {str(entry)[:80]}")
        name = entry["name"]
        if name in seen:
            raise MilesError(f"{LOAD_FORMAT}: tensor '{name}' is listed twice")
        seen.add(name)
        dtype = parse_dtype(str(entry.get("dtype")), f"{LOAD_FORMAT} tensor '{name}'")
        shape = entry.get("shape")
        if not isinstance(shape, list) or any(type(s) is not int or s < 0 for s in shape):
            raise MilesError(f"{LOAD_FORMAT}: tensor '{name}' has shape {shape!r}; expected a list of integers >= 0")
        tensor = IpcTensor(name, dtype, tuple(shape), _int(entry, "offset"))
        if tensor.offset % ALIGN or tensor.offset + tensor.nbytes > buffer_bytes:
            raise MilesError(f"{LOAD_FORMAT}: tensor '{name}' at byte {tensor.offset} (+{tensor.nbytes}) is not "
                             f"{ALIGN}-aligned inside the {buffer_bytes}-byte buffer")
        tensors.append(tensor)
    return tuple(tensors)


# -- CUDA ------------------------------------------------------------------------------------
def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def export_buffer(buffer: torch.Tensor) -> dict:
    """The handle fields of a CUDA uint8 buffer, from torch's own IPC reduction."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(buffer)
    (_, size, _, offset, _, _, device, handle, storage_size, storage_offset, _, ref_handle, ref_offset,
     event_handle, event_sync) = args
    return {"device_index": int(device), "handle": handle, "storage_size_bytes": int(storage_size),
            "storage_offset_bytes": int(storage_offset), "ref_counter_handle": ref_handle,
            "ref_counter_offset": int(ref_offset), "event_handle": event_handle,
            "event_sync_required": bool(event_sync), "buffer_offset": int(offset), "buffer_bytes": int(size[0])}


def open_buffer(bucket: IpcBucket, device: torch.device) -> torch.Tensor:
    """The trainer's uint8 buffer, mapped on `device` (which must be the GPU the trainer exported
    from) from the checked handle fields."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if device.type != "cuda" or device_uuid(device) != bucket.device_uuid:
        raise MilesError(f"{LOAD_FORMAT}: the engine runs on {device}, not on the trainer's GPU "
                         f"{bucket.device_uuid}; cuda_ipc needs both on one GPU (use 'nccl' otherwise)")
    f = bucket.fields
    return rebuild_cuda_tensor(
        torch.Tensor, (f["buffer_bytes"],), (1,), f["buffer_offset"], torch.UntypedStorage, torch.uint8,
        device.index if device.index is not None else torch.cuda.current_device(), f["handle"],
        f["storage_size_bytes"], f["storage_offset_bytes"], False, f["ref_counter_handle"], f["ref_counter_offset"],
        f["event_handle"], f["event_sync_required"])


class IpcMapping:
    """The server's end: the trainer's buffer mapped once and kept while descriptions name the same
    handle (the trainer exports its staging buffer once, so every bucket of every push does), and
    the views of the last descriptions (the same text: already checked, same views).

    Why keeping it is safe: the trainer keeps its staging buffer for the run and exports it again
    only when it replaces it, so a description naming the kept handle (with the same ref counter
    and event) is the live buffer the trainer just packed and synchronised. While the mapping is
    open, torch's IPC ref counter keeps the producer's memory from being freed or reused (a buffer
    the trainer drops goes to its IPC limbo until this side lets go). Dropped when a different
    handle arrives, on `/release_memory_occupation`, and with the engine (process exit)."""

    MAX_DESCRIPTIONS = 64

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._buffer: torch.Tensor | None = None
        self._described: OrderedDict[str, list[tuple[str, torch.Tensor]]] = OrderedDict()
        self.num_opens = 0

    def tensors(self, text: str, device: torch.device) -> list[tuple[str, torch.Tensor]]:
        """(name, view) of each tensor the description `text` names, in the mapped buffer; a
        `MilesError` for a bad description or a buffer that cannot be mapped."""
        named = self._described.get(text)
        if named is not None and self._key[0] == device:
            self._described.move_to_end(text)
            return named
        bucket = parse_description(text)
        buffer = self._buffer_for(bucket, device)
        named = [(t.name, buffer[t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape)) for t in bucket.tensors]
        self._described[text] = named
        if len(self._described) > self.MAX_DESCRIPTIONS:
            self._described.popitem(last=False)
        return named

    def drop(self) -> None:
        """Unmap the buffer (its views go with it)."""
        self._described.clear()
        self._key = self._buffer = None

    def _buffer_for(self, bucket: IpcBucket, device: torch.device) -> torch.Tensor:
        key = (device, bucket.device_uuid, tuple(sorted(bucket.fields.items())))
        if key == self._key:
            return self._buffer
        self.drop()
        try:
            self._buffer = open_buffer(bucket, device)
        except (MilesError, RuntimeError) as err:  # RuntimeError: CUDA refused the handle
            message = f"{LOAD_FORMAT}: cannot map the trainer's buffer ({err})".replace("\n", " ")
            raise MilesError(message) from None
        self._key = key
        self.num_opens += 1
        return self._buffer


class IpcDescriptions:
    """The trainer's end: the staging buffer's handle fields, exported once per buffer (each export
    takes one of torch's IPC ref counters and events, which the server's one mapping gives back
    once), and each bucket's JSON, built once per (names, layout)."""

    MAX_DESCRIPTIONS = 64

    def __init__(self) -> None:
        self._exported: tuple[torch.Tensor, dict, str] | None = None
        """(buffer, its handle fields, its device's UUID)."""
        self._texts: OrderedDict[tuple, str] = OrderedDict()
        self.num_exports = 0

    def text(self, buffer: torch.Tensor, names: list[str], tensors: list[torch.Tensor], offsets: list[int]) -> str:
        """The description of `tensors` (called `names`) at `offsets` of `buffer`."""
        if self._exported is None or self._exported[0] is not buffer:
            self._exported = (buffer, export_buffer(buffer), device_uuid(buffer.device))
            self._texts.clear()
            self.num_exports += 1
        key = (tuple(names), signature(tensors))
        text = self._texts.get(key)
        if text is None:
            _, fields, uuid = self._exported
            text = self._texts[key] = describe(fields, uuid, [
                IpcTensor(name, t.dtype, tuple(t.shape), offset) for name, t, offset in zip(names, tensors, offsets)])
            if len(self._texts) > self.MAX_DESCRIPTIONS:
                self._texts.popitem(last=False)
        return text


class CudaIpcSync:
    """`WeightSync` to `miles serve` engines on this GPU, bucket by bucket through one shared buffer."""

    def __init__(self, engine: RolloutEngine, cfg: SyncConfig, context: SyncContext | None = None) -> None:
        require_weight_routes(engine, "cuda_ipc")
        if not torch.cuda.is_available():
            raise MilesError("sync.transport = 'cuda_ipc' needs CUDA (the trainer and the engine on one GPU); "
                             "use 'nccl' or 'disk'")
        self.engine, self.cfg = engine, cfg
        self.bucket_bytes = cfg.bucket_mb << 20
        self.staging: FlatStaging | None = None
        self.descriptions = IpcDescriptions()

    @property
    def buffer(self) -> torch.Tensor | None:
        return None if self.staging is None else self.staging.buffer

    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncStats:
        start = time.perf_counter()
        self.engine.pause()
        try:
            counts = send_buckets(weights, self.bucket_bytes,
                                  lambda bucket, last: self._send(bucket, version if last else None))
        finally:
            self.engine.resume()
        return SyncStats(*counts, time.perf_counter() - start)

    def _send(self, bucket: list[tuple[str, torch.Tensor]], version: str | None) -> None:
        device = next((t.device for _, t in bucket if t.is_cuda), torch.device("cuda", torch.cuda.current_device()))
        if self.staging is None:
            self.staging = FlatStaging(device, align=ALIGN, min_bytes=self.bucket_bytes)
        self.staging.move_to(device)
        tensors = [t for _, t in bucket]
        _, offsets = self.staging.pack_with_offsets(tensors)
        torch.cuda.synchronize(device)  # the server reads the buffer from its own stream
        text = self.descriptions.text(self.staging.buffer, [name for name, _ in bucket], tensors, offsets)
        # returns once every server has copied the bucket out: only then may the buffer change
        self.engine.update_weights_from_tensor([text], load_format=LOAD_FORMAT, version=version,
                                               flush=version is not None)
