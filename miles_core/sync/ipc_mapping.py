"""The server's end of `cuda_ipc`: the trainer's CUDA storages, mapped from checked descriptions
(`ipc_format`) and kept while the trainer keeps naming them.

Mapping is what costs (~2 ms a storage; CUDA opens each allocation of the trainer once), so a
storage stays mapped while the descriptions name it, and the views of a description already seen
(the same text: already checked) are handed out again. The trainer names the same storages push
after push (its staging buffer, or its own weights), so a push after the first maps nothing.

Why keeping a mapping is safe: the trainer exports a storage once and again only when it is a
new one, so a description naming a kept storage (the same handle, ref counter and event) is the
live memory the trainer just wrote and synchronised. While the mapping is open, torch's IPC ref
counter keeps the producer's memory from being freed or reused (a storage the trainer drops goes
to its IPC limbo until this side lets go). A description that shares no storage with the ones
kept starts afresh (the old mappings are let go: a new staging buffer, or the trainer's weights
instead of its buffer); all go on `/release_memory_occupation` and with the engine.
"""

from __future__ import annotations

import base64
from collections import OrderedDict
from dataclasses import dataclass

import torch

from miles_core.errors import MilesError
from miles_core.sync.ipc_format import LOAD_FORMAT, IpcDescription, digest, parse_description, referenced


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def open_storage(fields: dict, uuid: str, device: torch.device) -> torch.Tensor:
    """The shared byte range of one trainer storage as a uint8 tensor on `device` (which must be
    the GPU the trainer exported from), rebuilt by torch from the checked handle fields."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if device.type != "cuda" or device_uuid(device) != uuid:
        raise MilesError(f"{LOAD_FORMAT}: the engine runs on {device}, not on the trainer's GPU {uuid}; "
                         "cuda_ipc needs both on one GPU (use 'nccl' otherwise)")
    f = fields
    return rebuild_cuda_tensor(
        torch.Tensor, (f["buffer_bytes"],), (1,), f["buffer_offset"], torch.UntypedStorage, torch.uint8,
        device.index if device.index is not None else torch.cuda.current_device(), f["handle"],
        f["storage_size_bytes"], f["storage_offset_bytes"], False, f["ref_counter_handle"], f["ref_counter_offset"],
        f["event_handle"], f["event_sync_required"])


@dataclass
class _Described:
    device: torch.device
    keys: frozenset
    named: tuple[tuple[str, torch.Tensor], ...]
    digest: str


class UnknownReference(MilesError):
    """A reference to a description this server has not kept (it needs the whole text)."""


class IpcMapping:
    """The storages a server has mapped and the views of the descriptions it has seen."""

    MAX_DESCRIPTIONS = 64

    def __init__(self) -> None:
        self._mapped: dict[tuple, torch.Tensor] = {}
        self._described: OrderedDict[str, _Described] = OrderedDict()
        self._texts: dict[str, str] = {}
        """sha256 -> text of the descriptions kept (what references name)."""
        self.num_opens = 0
        self._copied: tuple[torch.cuda.Event, str] | None = None

    def record_copied(self, device: torch.device) -> str:
        """Record, on `device`'s current stream, that the copies queued so far are done reading the
        trainer's memory; returns the interprocess event's handle (base64), which the trainer
        waits on instead of this side synchronising (`local_channel`)."""
        if self._copied is None or self._copied[0].device != device:
            event = torch.cuda.Event(interprocess=True)
            event.record(torch.cuda.current_stream(device))
            self._copied = (event, base64.b64encode(event.ipc_handle()).decode())
        else:
            self._copied[0].record(torch.cuda.current_stream(device))
        return self._copied[1]

    def tensors(self, text: str, device: torch.device) -> tuple[tuple[str, torch.Tensor], ...]:
        """(name, view) of each tensor the description `text` names, in the mapped storages; a
        `MilesError` for a bad description or a storage that cannot be mapped, `UnknownReference`
        for a reference to a description not kept."""
        wanted = referenced(text)
        if wanted is not None:
            if wanted not in self._texts:
                raise UnknownReference(f"{LOAD_FORMAT}: description {wanted[:12]}... is not known here (new server, "
                                       "or its memory was released); send it whole")
            text = self._texts[wanted]
        seen = self._described.get(text)
        if seen is not None and seen.device == device:
            self._described.move_to_end(text)
            return seen.named
        description = parse_description(text)
        keys = [(device, description.device_uuid, tuple(sorted(f.items()))) for f in description.storages]
        if not self._mapped.keys() & set(keys):
            self.drop()
        buffers = [self._buffer(key, fields, description, device) for key, fields in zip(keys, description.storages)]
        named = tuple((t.name, buffers[t.storage][t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape))
                      for t in description.tensors)  # a tuple: the engine knows it again by identity
        described = self._described[text] = _Described(device, frozenset(keys), named, digest(text))
        self._texts[described.digest] = text
        if len(self._described) > self.MAX_DESCRIPTIONS:
            _, old = self._described.popitem(last=False)
            del self._texts[old.digest]
            self._forget_unnamed()
        return named

    def drop(self) -> None:
        """Unmap every storage (their views go with them)."""
        self._described.clear()
        self._texts.clear()
        self._unmap(list(self._mapped))

    def _buffer(self, key: tuple, fields: dict, description: IpcDescription, device: torch.device) -> torch.Tensor:
        buffer = self._mapped.get(key)
        if buffer is not None:
            return buffer
        try:
            buffer = open_storage(fields, description.device_uuid, device)
        except (MilesError, RuntimeError) as err:  # RuntimeError: CUDA refused the handle
            message = f"{LOAD_FORMAT}: cannot map the trainer's memory ({err})".replace("\n", " ")
            raise MilesError(message) from None
        self._mapped[key] = buffer
        self.num_opens += 1
        return buffer

    def _forget_unnamed(self) -> None:
        named = frozenset().union(*(seen.keys for seen in self._described.values()))
        self._unmap([key for key in self._mapped if key not in named])

    def _unmap(self, keys: list) -> None:
        """Let these storages go, once copies still queued from them are done (an answer may have
        come before its copies ran: `record_copied`)."""
        devices = {self._mapped[key].device for key in keys if self._mapped[key].is_cuda}
        for device in devices:
            torch.cuda.synchronize(device)
        for key in keys:
            del self._mapped[key]
