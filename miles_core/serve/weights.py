"""Weight updates of a served engine: a HF checkpoint folder, safetensors blobs in a request, or
(`load_format = "miles_cuda_ipc"`) CUDA memory of the trainer on the same GPU (its staging buffer
or its weights where they lie, `sync/cuda_ipc.py`), which stays mapped from push to push (one
`IpcMapping` per engine, dropped with the engine or by `forget_ipc_mapping` when the engine
releases its memory).

All run on the batching worker's thread, between batches. The engine checks every name and
shape before it writes any tensor, so a refused update leaves the old weights in place. Tensors
sent over HTTP must be safetensors (SGLang sends pickled tensors; unpickling network input would
run arbitrary code, so miles serve refuses anything else; a CUDA IPC handle comes as checked JSON
fields, never pickled).
"""

from __future__ import annotations

import base64
import binascii
import weakref
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from miles_core.checkpoint.hf import iter_dense_state_dict
from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import MilesError
from miles_core.serve.state import RequestError
from miles_core.sync.ipc_format import LOAD_FORMAT
from miles_core.sync.ipc_mapping import IpcMapping, UnknownReference

_MAPPINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Engine -> its `IpcMapping` (weak: a mapping never outlives its engine)."""


def load_disk_weights(engine: RolloutEngine, path: Path, version: str | None, flush: bool) -> str:
    """Load every tensor of the HF checkpoint at `path` into the engine (a quantised one dequantised)."""
    return _apply(engine, lambda: iter_dense_state_dict(path), version, flush, f"'{path}'")


def load_tensor_weights(engine: RolloutEngine, blobs: list[str], version: str | None, flush: bool,
                        load_format: str | None = None, *, wait: bool = True) -> str:
    """Load base64 safetensors blobs (`serialized_named_tensors`) into the engine (`miles_cuda_ipc`:
    descriptions of the trainer's memory, `load_ipc_weights`)."""
    if load_format == LOAD_FORMAT:
        return load_ipc_weights(engine, blobs, version, flush, wait=wait)
    if load_format not in (None, "safetensors"):
        raise RequestError(f"load_format '{load_format}' is not supported; expected safetensors or {LOAD_FORMAT}")
    tensors = {}
    for number, blob in enumerate(blobs):
        try:
            tensors.update(load_safetensors(base64.b64decode(blob, validate=True)))
        except (binascii.Error, ValueError, SafetensorError) as err:
            raise RequestError(f"serialized_named_tensors[{number}] is not base64 safetensors ({err})") from None
    return _apply(engine, lambda: tensors.items(), version, flush, f"{len(tensors)} tensors")


def _apply(engine: RolloutEngine, named, version: str | None, flush: bool, what: str) -> str:
    version = engine.weight_version if version is None else version
    try:
        engine.update_weights(named(), version=version)
    except MilesError as err:
        raise RequestError(f"weights from {what} refused: {err}") from None
    if flush:
        engine.flush_cache()
    return f"Succeeded to update model weights from {what} (weight_version {version})."


def ipc_mapping(engine: RolloutEngine) -> IpcMapping:
    """The engine's mapping of the trainer's memory (made on first use)."""
    mapping = _MAPPINGS.get(engine)
    if mapping is None:
        mapping = _MAPPINGS[engine] = IpcMapping()
    return mapping


def forget_ipc_mapping(engine: RolloutEngine) -> None:
    """Unmap the trainer's memory (the engine releases its memory, or the server stops)."""
    mapping = _MAPPINGS.pop(engine, None)
    if mapping is not None:
        mapping.drop()


def load_ipc_weights(engine: RolloutEngine, descriptions: list[str], version: str | None, flush: bool, *,
                     wait: bool = True) -> str:
    """Copy the tensors of the trainer's CUDA memory (one JSON description each) into the engine.
    `wait`: answer only once the copies are done, so the trainer may write there again; else (the
    local channel) once they are queued, with `copied_event` recorded after them for the
    trainer to wait on (a failure still waits)."""
    import torch

    if not descriptions:
        raise RequestError(f"serialized_named_tensors is empty; expected one {LOAD_FORMAT} description")
    device = getattr(engine, "device", torch.device("cpu"))
    mapping = ipc_mapping(engine)
    try:
        buckets = [mapping.tensors(text, device) for text in descriptions]
    except UnknownReference as err:  # the trainer sends the whole description again
        raise RequestError(str(err), 409) from None
    except MilesError as err:
        raise RequestError(str(err)) from None
    try:
        for named in buckets:
            message = _apply(engine, lambda: named, version, flush, f"{len(named)} CUDA IPC tensors")
    except BaseException:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a refusal is answered once the copies before it are done
        raise
    if device.type == "cuda" and wait:
        torch.cuda.synchronize(device)  # the copies are done before the trainer reuses its memory
    return message


def copied_event(engine: RolloutEngine) -> str | None:
    """The handle of the event recorded after the engine's last CUDA IPC copies (None on CPU)."""
    device = getattr(engine, "device", None)
    if device is None or device.type != "cuda":
        return None
    return ipc_mapping(engine).record_copied(device)
