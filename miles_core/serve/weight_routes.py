"""Weight routes of `miles serve` beyond disk and safetensors: SGLang's distributed weight update
(`/init_weights_update_group`, `/update_weights_from_distributed`,
`/destroy_weights_update_group`, the server side of the `nccl` sync transport) and
`/weights_checksum` (sha256 of tensors the engine holds, for `sync.check_weight_update_equal`) and
`/weight_channel` (where the local weight channel listens, `weight_channel.py`).
A bucket comes as one broadcast per tensor, or with SGLang's `load_format = "flattened_bucket"`
as one broadcast of all its bytes (`sync.flat`).

Everything that touches the group or the weights runs on the batching worker's thread, between
batches. Joining blocks that thread until every rank has joined (as in SGLang). A bucket is
received whole into tensors of the announced dtypes and shapes on the engine's device before
anything is checked, so a bucket the engine refuses (unknown name, wrong shape) still takes part
in every broadcast and the group stays in step; the engine checks every name and shape before it
writes any, so a refused bucket leaves the old weights in place. A flat bucket lands in one byte
buffer per group, reused bucket after bucket with its views cached per signature
(`flat.FlatReceiver`: the engine copies a bucket out before the next is received, and ~300
per-tensor views cost ~1 ms a bucket); a memory release frees it. A malformed request (unknown
dtype, lists of different lengths, unknown group) is refused before any broadcast: the sender
cannot be in step with it anyway.
"""

from __future__ import annotations

import weakref
from typing import Literal

import torch
from fastapi import APIRouter, Request
from pydantic import Field

from miles_core.errors import MilesError
from miles_core.serve.bodies import parse_body
from miles_core.serve.schemas import Strict
from miles_core.serve.state import RequestError, ServeState
from miles_core.serve.weight_channel import WeightChannelServer
from miles_core.sync import flat as flat_bucket
from miles_core.sync.group import WeightGroup, dtype_name, parse_dtype, tensor_sha256

router = APIRouter()

GROUP_TIMEOUT_S = 600.0
"""Seconds a join or a broadcast may wait for the other ranks before it fails."""

ROUTES = frozenset({"/init_weights_update_group", "/update_weights_from_distributed",
                    "/destroy_weights_update_group", "/weight_channel"})
"""Routes that change the weights: they need the api key (see `app.PROTECTED_ROUTES`)."""
_RECEIVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Group -> the `FlatReceiver` of its flat buckets (weak: it goes with the group)."""


class InitGroupBody(Strict):
    """SGLang `InitWeightsUpdateGroupReqInput`."""

    master_address: str = Field(min_length=1)
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)
    group_name: str = "weight_update_group"
    backend: Literal["nccl", "gloo"] = "nccl"


class DistributedBody(Strict):
    """SGLang `UpdateWeightsFromDistributedReqInput`."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None
    torch_empty_cache: bool = False


class DestroyGroupBody(Strict):
    group_name: str = "weight_update_group"


class ChecksumBody(Strict):
    names: list[str] = Field(min_length=1)


def _state(request: Request) -> ServeState:
    return request.app.state.serve


def _groups(request: Request) -> dict[str, WeightGroup]:
    if not hasattr(request.app.state, "weight_groups"):
        request.app.state.weight_groups = {}
    return request.app.state.weight_groups


def _device(state: ServeState) -> torch.device:
    return getattr(state.engine, "device", torch.device("cpu"))


async def _on_worker(state: ServeState, fn, *, refused: str, alone: bool = False) -> dict:
    """Run `fn` on the worker thread (`alone`: with running requests aborted and new ones held,
    `BatchingWorker.control`); a failure answers SGLang's `{success: false, message}` (400)."""
    try:  # the version the update left, so the trainer needs no /get_model_info call to check it
        message = await state.worker.control(fn, alone=alone)
        return {"success": True, "message": message, "weight_version": state.engine.weight_version}
    except (RequestError, MilesError, RuntimeError, ValueError) as err:  # gloo/NCCL failures are RuntimeErrors
        message = f"{refused}: {err}".replace("\n", " ")
        raise RequestError(message) from None


@router.post("/init_weights_update_group")
async def init_weights_update_group(request: Request):
    state, body = _state(request), await parse_body(request, InitGroupBody)
    groups = _groups(request)
    if body.group_name in groups:
        raise RequestError(f"weight-update group '{body.group_name}' exists already; destroy it first", 409)
    if body.rank_offset >= body.world_size:
        raise RequestError(f"rank_offset {body.rank_offset} is outside world_size {body.world_size}")
    if body.backend == "nccl" and _device(state).type != "cuda":
        raise RequestError(f"backend 'nccl' needs the engine on CUDA; it runs on {_device(state)} (use 'gloo')")

    def join() -> str:
        groups[body.group_name] = WeightGroup(
            master_address=body.master_address, master_port=body.master_port, rank=body.rank_offset,
            world_size=body.world_size, group_name=body.group_name, backend=body.backend, timeout_s=GROUP_TIMEOUT_S)
        return f"Joined weight-update group '{body.group_name}' as rank {body.rank_offset} of {body.world_size}."

    return await _on_worker(state, join, refused="joining the weight-update group failed")


@router.post("/update_weights_from_distributed")
async def update_weights_from_distributed(request: Request):
    state, body = _state(request), await parse_body(request, DistributedBody)
    group = _groups(request).get(body.group_name)
    if group is None:
        raise RequestError(f"no weight-update group '{body.group_name}' (POST /init_weights_update_group first)")
    dtypes = _announced(body)

    def receive() -> str:
        tensors = _received(group, _device(state), dtypes, body.shapes, flat=body.load_format == flat_bucket.LOAD_FORMAT)
        version = state.engine.weight_version if body.weight_version is None else body.weight_version
        try:
            state.engine.update_weights(zip(body.names, tensors), version=version)
        except MilesError as err:
            raise RequestError(f"{err}; the old weights are kept") from None
        if body.flush_cache:
            state.engine.flush_cache()
        return f"Succeeded to update model weights from the distributed group (weight_version {version})."

    return await _on_worker(state, receive, refused="weights from the distributed group refused",
                            alone=body.abort_all_requests)


def _received(group: WeightGroup, device: torch.device, dtypes: list[torch.dtype], shapes: list[list[int]],
              *, flat: bool) -> list[torch.Tensor]:
    """The whole bucket, received before any check (the group must stay in step): one broadcast
    of its bytes (`flattened_bucket`), or one broadcast per tensor."""
    if flat:
        receiver = _RECEIVERS.get(group)
        if receiver is None or receiver.device != device:
            receiver = _RECEIVERS[group] = flat_bucket.FlatReceiver(device)
        buffer, layout = receiver.buffer_for(dtypes, shapes)
        group.broadcast(buffer)
        return flat_bucket.unflatten_views(layout, dtypes, shapes)
    tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in zip(shapes, dtypes)]
    for tensor in tensors:
        group.broadcast(tensor)
    return tensors


def _announced(body: DistributedBody) -> list[torch.dtype]:
    """The dtypes of the bucket, once its three lists agree and every dtype and shape is usable."""
    if body.load_format not in (None, flat_bucket.LOAD_FORMAT):
        raise RequestError(f"load_format '{body.load_format}' is not supported here; expected none (a broadcast "
                           f"per tensor) or '{flat_bucket.LOAD_FORMAT}' (one broadcast of the bucket's bytes)")
    if not len(body.names) == len(body.dtypes) == len(body.shapes):
        raise RequestError(f"names, dtypes and shapes have {len(body.names)}, {len(body.dtypes)} and "
                           f"{len(body.shapes)} entries; expected one each per tensor")
    dtypes = []
    for name, dtype, shape in zip(body.names, body.dtypes, body.shapes):
        try:
            dtypes.append(parse_dtype(dtype, f"tensor '{name}'"))
        except MilesError as err:
            raise RequestError(str(err)) from None
        if any(size < 0 for size in shape):
            raise RequestError(f"tensor '{name}' has shape {shape}; sizes must be >= 0")
    return dtypes


@router.post("/destroy_weights_update_group")
async def destroy_weights_update_group(request: Request):
    state, body = _state(request), await parse_body(request, DestroyGroupBody)
    group = _groups(request).pop(body.group_name, None)
    if group is None:
        raise RequestError(f"no weight-update group '{body.group_name}'")

    def destroy() -> str:
        _RECEIVERS.pop(group, None)
        group.destroy()
        return f"Destroyed weight-update group '{body.group_name}'."

    return await _on_worker(state, destroy, refused="destroying the weight-update group failed")


def forget_receive_buffers(groups: dict[str, WeightGroup]) -> None:
    """Free the flat-bucket buffers of `groups` (the engine releases its memory); the next bucket
    allocates again."""
    for group in groups.values():
        _RECEIVERS.pop(group, None)


@router.post("/weight_channel")
async def weight_channel(request: Request):
    """{"path", "token"} of the local weight channel (`weight_channel.py`), opened on first ask."""
    state = _state(request)
    if state.weight_channel is None:
        try:
            state.weight_channel = WeightChannelServer(state)
        except OSError as err:
            raise RequestError(f"cannot open a local weight channel: {err}", 501) from None
    return {"path": state.weight_channel.path, "token": state.weight_channel.token}


@router.post("/weights_checksum")
async def weights_checksum(request: Request):
    """{"weight_version", "tensors": {name: {"dtype", "shape", "sha256"}}} of the tensors named."""
    state, body = _state(request), await parse_body(request, ChecksumBody)
    get = getattr(state.engine, "get_weights_by_name", None)
    if not callable(get):
        raise RequestError(f"{type(state.engine).__name__} does not report its weights", 501)

    def digests() -> dict:
        tensors = {}
        for name in body.names:
            try:
                tensor = get(name)
            except MilesError as err:
                raise RequestError(str(err)) from None
            tensors[name] = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                             "sha256": tensor_sha256(tensor)}
        return {"weight_version": state.engine.weight_version, "tensors": tensors}

    return await state.worker.control(digests)
