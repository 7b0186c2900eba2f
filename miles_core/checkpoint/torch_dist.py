"""Megatron `torch_dist` checkpoints: PyTorch DCP folders in megatron-core's layout.

A checkpoint root, as megatron's training loop writes it:

    ROOT/latest_checkpointed_iteration.txt   "release" or the iteration number
    ROOT/release/ (or iter_0000007/)
        .metadata        DCP metadata: each key's dtype, global shape and stored chunks
        __K_0.distcp     chunk data: torch.save'd tensors and raw byte objects
        common.pt        non-sharded state: args (megatron's argparse Namespace),
                         checkpoint_version 3.0, iteration, and here the HF config
        metadata.json    {"sharded_backend": "torch_dist", ...}

Keys are what megatron-core's `GPTModel.sharded_state_dict()` produces at TP=PP=EP=1. When all
decoder layers are alike they are stacked: `decoder.layers.<name>` has a leading layer dim (one
chunk per layer); otherwise (dense first layers) each layer has its own `decoder.layers.<i>.<name>`.
Routed experts add an expert dim after it (`...mlp.experts.experts.linear_fc1.weight`). MTP
layers are always per layer: `mtp.layers.<k>.<name>`. Every linear module also has an
`<module>._extra_state/shard_<offsets>_<shape>` byte object (None here), which megatron-core
requests on load. Reading accepts both key styles.

Streaming: the writer buffers chunks until a file's worth (`max_file_bytes`) and writes them
as one `__K_0.distcp`, so memory holds at most one file plus one tensor; the reader reads one
layer (or one expert) of a key at a time, touching only the chunks that overlap it.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import re
import types
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner, TensorWriteData, WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from miles_core.checkpoint.mapping.base import LINEAR_MODULES, Plan, Slot
from miles_core.errors import MilesError

TRACKER = "latest_checkpointed_iteration.txt"
COMMON = "common.pt"
BACKEND_CONFIG = "metadata.json"
DCP_METADATA = ".metadata"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")
EXPERT_MARK = "mlp.experts.experts."


# ---- folders ---------------------------------------------------------------------------------

def find_checkpoint(path: Path) -> Path | None:
    """The DCP folder for `path`: itself, or the one a root's tracker file names; else None."""
    if (path / DCP_METADATA).is_file() or (path / BACKEND_CONFIG).is_file():
        return path
    tracker = path / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text(encoding="utf-8").strip()
    if text != "release" and not text.isdigit():
        raise MilesError(f"'{tracker}' holds '{text}'; expected an iteration number or 'release'")
    folder = path / ("release" if text == "release" else f"iter_{int(text):07d}")
    if not folder.is_dir():
        raise MilesError(f"'{tracker}' names '{folder.name}', which does not exist in '{path}'")
    return folder


def write_layout(root: Path, iteration: int | None, common: dict[str, Any]) -> Path:
    """Create ROOT/{release|iter_N}/ with common.pt and metadata.json plus the tracker; return
    the DCP folder (tensors are written into it by `DistWriter`)."""
    folder = root / ("release" if iteration is None else f"iter_{iteration:07d}")
    folder.mkdir(parents=True)
    torch.save(common, folder / COMMON)
    (folder / BACKEND_CONFIG).write_text(json.dumps(BACKEND), encoding="utf-8")
    (root / TRACKER).write_text("release" if iteration is None else str(iteration), encoding="utf-8")
    return folder


def megatron_common(args: dict[str, Any], hf_config: dict[str, Any], iteration: int | None) -> dict[str, Any]:
    """common.pt content: what megatron's `generate_state_dict` stores outside the model."""
    return {"args": argparse.Namespace(**args), "checkpoint_version": 3.0,
            "iteration": iteration or 0, "hf_config": hf_config}


# ---- keys ------------------------------------------------------------------------------------

def slot_key(slot: Slot, plan: Plan) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(DCP key, leading global dims, leading offsets) of a slot in megatron's layout."""
    if not slot.scope:
        return slot.name, (), ()
    if slot.scope == "decoder" and plan.stacked:
        key, lead, offsets = f"decoder.layers.{slot.name}", (plan.num_layers,), (slot.layer,)
    else:
        key, lead, offsets = f"{slot.scope}.layers.{slot.layer}.{slot.name}", (), ()
    if slot.expert >= 0:
        lead, offsets = lead + (plan.num_experts[(slot.scope, slot.layer)],), offsets + (slot.expert,)
    return key, lead, offsets


def extra_state_keys(plan: Plan) -> list[str]:
    """The `_extra_state` object keys megatron-core's linear modules request for this model."""
    keys = {}
    for link in plan.links:
        module = link.slot.name.rsplit(".", 1)[0]
        if module.rsplit(".", 1)[-1] not in LINEAR_MODULES:
            continue
        key, lead, offsets = slot_key(Slot(link.slot.scope, link.slot.layer, link.slot.expert, module), plan)
        shape = ".".join(map(str, lead)) or "1"
        offset = ".".join(map(str, offsets)) or "0"
        keys[f"{key}._extra_state/shard_{offset}_{shape}"] = None
    return list(keys)


_PER_LAYER = re.compile(r"(decoder|mtp)\.layers\.(\d+)\.(.+)")


def parse_keys(tensors: dict[str, TensorStorageMetadata]) -> tuple[dict[Slot, tuple[str, tuple[int, ...]]], list[str]]:
    """Map every model tensor of a checkpoint to slots (names as stored, aliases unresolved).

    Returns the slots with their (key, index) and the model keys that fit no slot pattern.
    Keys outside the model (optimizer state, RNG, ...) are ignored.
    """
    slots: dict[Slot, tuple[str, tuple[int, ...]]] = {}
    odd: list[str] = []
    for key, md in tensors.items():
        if not key.startswith(MODEL_PREFIXES):
            continue
        match = _PER_LAYER.fullmatch(key)
        if match:
            scope, layer, name = match[1], int(match[2]), match[3]
            _add(slots, scope, [(layer, ())], name, key, tuple(md.size))
        elif key.startswith("decoder.layers."):
            name = key.removeprefix("decoder.layers.")
            _add(slots, "decoder", [(i, (i,)) for i in range(md.size[0])], name, key, tuple(md.size[1:]))
        elif key.startswith(("decoder.layers", "mtp.")):
            odd.append(key)
        else:
            slots[Slot("", -1, -1, key)] = (key, ())
    return slots, odd


def _add(slots: dict, scope: str, layers: list[tuple[int, tuple[int, ...]]], name: str, key: str,
         shape: tuple[int, ...]) -> None:
    experts = EXPERT_MARK in name
    for layer, index in layers:
        for e in range(shape[0]) if experts else [-1]:
            slots[Slot(scope, layer, e, name)] = (key, index + ((e,) if experts else ()))


# ---- writing ---------------------------------------------------------------------------------

def _unused(step: str) -> RuntimeError:
    return RuntimeError(f"DCP planner step '{step}' is not part of miles' direct read/write path")


class _Resolver(SavePlanner):
    """Hands the storage writer the buffered data of each write item."""

    def __init__(self, data: dict[MetadataIndex, Any]) -> None:
        self._data = data

    # DCP's planning steps are not used: DistWriter builds each plan itself and calls the
    # storage writer directly, so only `resolve_data` is ever called.
    def set_up_planner(self, *args: Any, **kwargs: Any) -> None: ...
    def create_local_plan(self) -> SavePlan: raise _unused("create_local_plan")
    def create_global_plan(self, plans: list[SavePlan]) -> Any: raise _unused("create_global_plan")
    def finish_plan(self, plan: SavePlan) -> SavePlan: return plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        return self._data[write_item.index]


class DistWriter:
    """Write tensor chunks and byte objects into a DCP folder, one `__K_0.distcp` per file's worth."""

    def __init__(self, folder: Path, max_file_bytes: int = 2**30) -> None:
        self._storage = FileSystemWriter(folder, single_file_per_rank=True, sync_files=False, thread_count=1)
        self._storage.set_up_storage_writer(True)
        self._max_file_bytes = max_file_bytes
        self._metadata: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        self._pending: list[tuple[WriteItem, Any]] = []
        self._pending_bytes = 0
        self._results: list[Any] = []
        self._num_files = 0

    def add_tensor(self, key: str, global_shape: tuple[int, ...], offsets: tuple[int, ...],
                   tensor: torch.Tensor) -> None:
        """Store `tensor` as the chunk at `offsets` of the global tensor `key`."""
        tensor = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        props = TensorProperties(dtype=tensor.dtype)
        md = self._metadata.setdefault(key, TensorStorageMetadata(props, torch.Size(global_shape), []))
        if md.properties.dtype != tensor.dtype or tuple(md.size) != tuple(global_shape):
            raise MilesError(f"'{key}' mixes dtypes or shapes across chunks ({md.properties.dtype} "
                             f"{tuple(md.size)} vs {tensor.dtype} {tuple(global_shape)})")
        chunk = ChunkStorageMetadata(torch.Size(offsets), tensor.shape)
        md.chunks.append(chunk)
        item = WriteItem(MetadataIndex(key, offsets), WriteItemType.SHARD,
                         tensor_data=TensorWriteData(chunk, props, torch.Size(global_shape)))
        self._queue(item, tensor, tensor.nbytes)

    def add_object(self, key: str, obj: Any) -> None:
        """Store a byte object as megatron-core stores a ShardedObject: torch.save([obj])."""
        buffer = io.BytesIO()
        torch.save([obj], buffer)
        buffer.seek(0)
        self._metadata[key] = BytesStorageMetadata()
        self._queue(WriteItem(MetadataIndex(key), WriteItemType.BYTE_IO), buffer, buffer.getbuffer().nbytes)

    def _queue(self, item: WriteItem, data: Any, nbytes: int) -> None:
        self._pending.append((item, data))
        self._pending_bytes += nbytes
        if self._pending_bytes >= self._max_file_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        plan = SavePlan([item for item, _ in self._pending], storage_data=_StoragePrefix(f"__{self._num_files}_"))
        resolver = _Resolver({item.index: data for item, data in self._pending})
        self._results.extend(self._storage.write_data(plan, resolver).wait())
        self._pending, self._pending_bytes = [], 0
        self._num_files += 1

    def finish(self) -> None:
        """Write the remaining chunks and the `.metadata` that indexes every file."""
        self._flush()
        self._storage.finish(Metadata(state_dict_metadata=self._metadata), [self._results])


# ---- reading ---------------------------------------------------------------------------------

class _Target(LoadPlanner):
    """Copies read chunks into the matching region of one destination tensor."""

    def __init__(self, target: torch.Tensor) -> None:
        self._target = target

    # As above: the reader builds its plans itself; only tensor resolution is called.
    def set_up_planner(self, *args: Any, **kwargs: Any) -> None: ...
    def create_local_plan(self) -> LoadPlan: raise _unused("create_local_plan")
    def create_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]: raise _unused("create_global_plan")
    def finish_plan(self, plan: LoadPlan) -> LoadPlan: return plan
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None: raise _unused("load_bytes")
    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None: ...

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        region = self._target
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            region = region.narrow(dim, start, length)
        return region


class DistReader:
    """Random access to the tensors of a DCP folder, one layer or expert at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if not (folder / DCP_METADATA).is_file():
            raise MilesError(f"'{folder}' has no {DCP_METADATA}; not a complete torch_dist checkpoint")
        self._storage = FileSystemReader(folder)
        try:
            self.metadata = self._storage.read_metadata()
        except (pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise MilesError(f"cannot read '{folder / DCP_METADATA}': {err}") from None
        self._storage.set_up_storage_reader(self.metadata, True)
        self.tensors = {k: v for k, v in self.metadata.state_dict_metadata.items()
                        if isinstance(v, TensorStorageMetadata)}
        missing = sorted({info.relative_path for info in self.metadata.storage_data.values()
                          if not (folder / info.relative_path).is_file()})
        if missing:
            raise MilesError(f"torch_dist checkpoint '{folder}' is missing {', '.join(missing)}")

    def read(self, key: str, index: tuple[int, ...] = ()) -> torch.Tensor:
        """`tensor[index]` of the global tensor `key`, reading only the chunks that overlap it."""
        md = self.tensors[key]
        lead = len(index)
        offsets = torch.Size(tuple(index) + (0,) * (len(md.size) - lead))
        sizes = torch.Size((1,) * lead + tuple(md.size[lead:]))
        target = torch.empty(sizes, dtype=md.properties.dtype)
        items = create_read_items_for_chunk_list(key, md, [ChunkStorageMetadata(offsets, sizes)])
        if sum(_numel(item.lengths) for item in items) != target.numel():
            raise MilesError(f"torch_dist checkpoint '{self.folder}' does not cover all of '{key}' "
                             f"at {tuple(index)}: chunks are missing")
        self._storage.read_data(LoadPlan(items), _Target(target)).wait()
        return target.reshape(md.size[lead:])

    def common(self) -> dict[str, Any]:
        """common.pt, unpickled without running code: classes outside plain containers,
        Namespaces and torch types (megatron enums, configs) come back as opaque stand-ins."""
        path = self.folder / COMMON
        if not path.is_file():
            return {}
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED)
        except (pickle.UnpicklingError, RuntimeError, EOFError, TypeError, ValueError) as err:
            raise MilesError(f"cannot read '{path}': {str(err).splitlines()[0]}") from None
        return state if isinstance(state, dict) else {}


def _numel(lengths: Any) -> int:
    count = 1
    for length in lengths:
        count *= int(length)
    return count


class _Opaque:
    """Stand-in for a class common.pt names that we do not load (kept as its arguments)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:  # e.g. an opaque getattr(...) result
        return _Opaque(*args)


_ALLOWED = {("argparse", "Namespace"), ("types", "SimpleNamespace"), ("collections", "OrderedDict"),
            ("pathlib", "PosixPath"), ("pathlib", "Path"), ("pathlib", "PurePosixPath")}
_BUILTINS = {"set", "frozenset", "slice", "complex", "bytearray", "tuple", "list", "dict"}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "builtins" and name in _BUILTINS) or _torch_value(module, name):
            return super().find_class(module, name)
        return type(name, (_Opaque,), {"__module__": f"opaque.{module}"})


def _torch_value(module: str, name: str) -> bool:
    """Tensor rebuild helpers and torch value types (dtypes, Size); never a torch function."""
    if module == "torch._utils":
        return name.startswith("_rebuild_")
    if module != "torch":
        return False
    kinds = (torch.dtype, torch.layout, torch.memory_format)
    return name in ("Size", "device") or isinstance(getattr(torch, name, None), kinds)


_RESTRICTED = types.SimpleNamespace(__name__="miles_restricted_pickle", Unpickler=_RestrictedUnpickler,
                                    load=pickle.load, UnpicklingError=pickle.UnpicklingError)

