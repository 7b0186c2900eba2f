"""Weight updates of a served engine: a HF checkpoint folder, or safetensors blobs in a request.

Both run on the batching worker's thread, between batches. The engine checks every name and
shape before it writes any tensor, so a refused update leaves the old weights in place. Tensors
sent over HTTP must be safetensors (SGLang sends pickled tensors; unpickling network input would
run arbitrary code, so miles serve refuses anything else).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from miles_core.checkpoint.hf import iter_dense_state_dict
from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import MilesError
from miles_core.serve.state import RequestError


def load_disk_weights(engine: RolloutEngine, path: Path, version: str | None, flush: bool) -> str:
    """Load every tensor of the HF checkpoint at `path` into the engine (a quantised one dequantised)."""
    return _apply(engine, lambda: iter_dense_state_dict(path), version, flush, f"'{path}'")


def load_tensor_weights(engine: RolloutEngine, blobs: list[str], version: str | None, flush: bool) -> str:
    """Load base64 safetensors blobs (`serialized_named_tensors`) into the engine."""
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
