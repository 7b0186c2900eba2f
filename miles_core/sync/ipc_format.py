"""The JSON description a `cuda_ipc` push sends (`load_format = "miles_cuda_ipc"`), and every check
the server makes on it before anything is mapped.

A description names the device (its UUID), one or more CUDA storages of the trainer (each by the
handle fields of torch's own IPC reduction, bytes as base64, and the byte range of it that is
shared), and the tensors to load: name, dtype, shape, which storage and at which byte offset. A
staged bucket is one storage (the trainer's staging buffer, every tensor 256-byte aligned); a
direct push names the storages of the trainer's own weights, each tensor where it lies.

A description already delivered travels again as a reference, `{"format", "same_as": its
sha256}` (a 0.6B push names ~300 storages: ~150 KB of JSON that took the server ~1 ms to read on
an H200's host each push); a server that does not know it (restarted, or its memory released)
answers 409 and gets the whole text.

Nothing is ever unpickled: a pickle from the network could run arbitrary code.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from miles_core.errors import MilesError
from miles_core.sync.group import dtype_name, parse_dtype
from miles_core.utils.layout import aligned_offsets

LOAD_FORMAT = "miles_cuda_ipc"
ALIGN = 256
"""Byte alignment of each tensor in a staging buffer (CUDA allocations are 256-aligned; any dtype fits)."""
BYTES_FIELDS = ("handle", "ref_counter_handle", "event_handle")
INT_FIELDS = ("device_index", "storage_size_bytes", "storage_offset_bytes", "ref_counter_offset", "buffer_offset",
              "buffer_bytes")


@dataclass(frozen=True)
class IpcTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Byte offset in its storage's shared range."""
    storage: int = 0
    """Index of its storage in the description."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class IpcDescription:
    """A parsed, checked description: the shared storages' handle fields and the tensors in them."""

    device_uuid: str
    storages: tuple[dict, ...]
    """Per storage, `reduce_tensor`'s handle fields: ints, bools and bytes (decoded from base64)."""
    tensors: tuple[IpcTensor, ...]


def layout(shapes_dtypes: Iterable[tuple[tuple[int, ...], torch.dtype]]) -> tuple[list[int], int]:
    """Aligned byte offsets of tensors packed in order, and the buffer size they need."""
    return aligned_offsets([IpcTensor("", dtype, tuple(shape), 0).nbytes for shape, dtype in shapes_dtypes], ALIGN)


def describe(storages: list[dict], device_uuid: str, tensors: list[IpcTensor]) -> str:
    """The JSON a server parses: each storage's handle fields (bytes as base64), device, tensors."""
    encoded = [{k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in fields.items()}
               for fields in storages]
    return json.dumps({"format": LOAD_FORMAT, "device_uuid": device_uuid, "storages": encoded, "tensors": [
        {"name": t.name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "storage": t.storage,
         "offset": t.offset} for t in tensors]})


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def reference(text: str) -> str:
    """What stands for the delivered description `text`."""
    return json.dumps({"format": LOAD_FORMAT, "same_as": digest(text)})


def referenced(text: str) -> str | None:
    """The digest a reference names, or None for a whole description; a `MilesError` for a
    reference that is malformed."""
    if len(text) > 512 or '"same_as"' not in text:
        return None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        return None  # not a reference; the description's own check names the problem
    if not isinstance(raw, dict) or "same_as" not in raw:
        return None
    value = raw["same_as"]
    if raw.get("format") != LOAD_FORMAT or not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise MilesError(f"{LOAD_FORMAT}: same_as must be a description's sha256 (64 hex digits), "
                         f"got {str(value)[:80]!r}")
    return value


def parse_description(text: str) -> IpcDescription:
    """Check a description field by field; a `MilesError` naming the first bad one otherwise."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, TypeError) as err:
        raise MilesError(f"{LOAD_FORMAT}: the description is not JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != LOAD_FORMAT:
        raise MilesError(f"{LOAD_FORMAT}: expected a JSON object with format '{LOAD_FORMAT}'")
    if not isinstance(raw.get("device_uuid"), str) or not raw["device_uuid"]:
        raise MilesError(f"{LOAD_FORMAT}: device_uuid must be a non-empty string")
    entries = raw.get("storages")
    if not isinstance(entries, list) or not entries:
        raise MilesError(f"{LOAD_FORMAT}: storages must be a non-empty list")
    storages = tuple(_storage(entry, number) for number, entry in enumerate(entries))
    return IpcDescription(raw["device_uuid"], storages, _tensors(raw.get("tensors"), storages))


def _storage(raw, number: int) -> dict:
    where = f"{LOAD_FORMAT} storage {number}"
    if not isinstance(raw, dict):
        raise MilesError(f"{where}: expected a JSON object of handle fields")
    fields = {name: _int(raw, name, where) for name in INT_FIELDS}
    for name in BYTES_FIELDS:
        fields[name] = _bytes(raw, name, where)
    if not isinstance(raw.get("event_sync_required"), bool):
        raise MilesError(f"{where}: event_sync_required must be true or false")
    fields["event_sync_required"] = raw["event_sync_required"]
    if fields["buffer_offset"] + fields["buffer_bytes"] > fields["storage_size_bytes"]:
        raise MilesError(f"{where}: range [{fields['buffer_offset']}, +{fields['buffer_bytes']}) lies outside "
                         f"its storage of {fields['storage_size_bytes']} bytes")
    return fields


def _int(raw: dict, name: str, where: str) -> int:
    value = raw.get(name)
    if type(value) is not int or value < 0:
        raise MilesError(f"{where}: {name} must be an integer >= 0, got {value!r}")
    return value


def _bytes(raw: dict, name: str, where: str) -> bytes:
    value = raw.get(name)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise MilesError(f"{where}: {name} must be base64, got {str(value)[:40]!r}") from None


def _tensors(entries, storages: tuple[dict, ...]) -> tuple[IpcTensor, ...]:
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
        tensors.append(_tensor(entry, name, storages))
    return tuple(tensors)


def _tensor(entry: dict, name: str, storages: tuple[dict, ...]) -> IpcTensor:
    where = f"{LOAD_FORMAT} tensor '{name}'"
    dtype = parse_dtype(str(entry.get("dtype")), where)
    shape = entry.get("shape")
    if not isinstance(shape, list) or any(type(s) is not int or s < 0 for s in shape):
        raise MilesError(f"{where} has shape {shape!r}; expected a list of integers >= 0")
    index = _int(entry, "storage", where)
    if index >= len(storages):
        raise MilesError(f"{where} names storage {index}; the description has {len(storages)}")
    tensor = IpcTensor(name, dtype, tuple(shape), _int(entry, "offset", where), index)
    shared = storages[index]["buffer_bytes"]
    if tensor.offset % dtype.itemsize or tensor.offset + tensor.nbytes > shared:
        raise MilesError(f"{where} at byte {tensor.offset} (+{tensor.nbytes}) is not {dtype.itemsize}-byte aligned "
                         f"inside the {shared} shared bytes of storage {index}")
    return tensor
