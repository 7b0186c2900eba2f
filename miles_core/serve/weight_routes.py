"""Weight routes of `miles serve` beyond disk and safetensors: SGLang's distributed weight update
(`/init_weights_update_group`, `/update_weights_from_distributed`,
`/destroy_weights_update_group`, the server side of the `nccl` sync transport) and
`/weights_checksum` (sha256 of tensors the engine holds, for `sync.check_weight_update_equal`) and
`/weight_channel` (where the local weight channel listens, `weight_channel.py`).
A bucket comes as one broadcast per tensor, or with SGLang's `load_format = "flattened_bucket"`
as one broadcast of all its bytes (`sync.flat`); how it is checked, received and loaded is
`distributed_weights.py`, which the local weight channel shares.

Everything that touches the group or the weights runs on the batching worker's thread, between
batches. Joining blocks that thread until every rank has joined (as in SGLang).
"""

from __future__ import annotations

from typing import Literal

import torch
from fastapi import APIRouter, Request
from pydantic import Field

from miles_core.errors import MilesError
from miles_core.serve.bodies import parse_body
from miles_core.serve.distributed_weights import (REFUSALS, REFUSED, DistributedBody, announced, forget_group,
                                                  receive_bucket, refusal)
from miles_core.serve.schemas import Strict
from miles_core.serve.state import RequestError, ServeState
from miles_core.serve.weight_channel import WeightChannelServer
from miles_core.sync.group import WeightGroup, dtype_name, tensor_sha256

router = APIRouter()

GROUP_TIMEOUT_S = 600.0
"""Seconds a join or a broadcast may wait for the other ranks before it fails."""

ROUTES = frozenset({"/init_weights_update_group", "/update_weights_from_distributed",
                    "/destroy_weights_update_group", "/weight_channel"})
"""Routes that change the weights: they need the api key (see `app.PROTECTED_ROUTES`)."""


class InitGroupBody(Strict):
    """SGLang `InitWeightsUpdateGroupReqInput`."""

    master_address: str = Field(min_length=1)
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)
    group_name: str = "weight_update_group"
    backend: Literal["nccl", "gloo"] = "nccl"


class DestroyGroupBody(Strict):
    group_name: str = "weight_update_group"


class ChecksumBody(Strict):
    names: list[str] = Field(min_length=1)


def _state(request: Request) -> ServeState:
    return request.app.state.serve


def _device(state: ServeState) -> torch.device:
    return getattr(state.engine, "device", torch.device("cpu"))


async def _on_worker(state: ServeState, fn, *, refused: str, alone: bool = False) -> dict:
    """Run `fn` on the worker thread (`alone`: with running requests aborted and new ones held,
    `BatchingWorker.control`); a failure answers SGLang's `{success: false, message}` (400)."""
    try:  # the version the update left, so the trainer needs no /get_model_info call to check it
        message = await state.worker.control(fn, alone=alone)
        return {"success": True, "message": message, "weight_version": state.engine.weight_version}
    except REFUSALS as err:
        raise refusal(err, refused) from None


@router.post("/init_weights_update_group")
async def init_weights_update_group(request: Request):
    state, body = _state(request), await parse_body(request, InitGroupBody)
    groups = state.weight_groups
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
    group, dtypes = announced(state, body)
    return await _on_worker(state, lambda: receive_bucket(state, group, body, dtypes), refused=REFUSED,
                            alone=body.abort_all_requests)


@router.post("/destroy_weights_update_group")
async def destroy_weights_update_group(request: Request):
    state, body = _state(request), await parse_body(request, DestroyGroupBody)
    group = state.weight_groups.pop(body.group_name, None)
    if group is None:
        raise RequestError(f"no weight-update group '{body.group_name}'")

    def destroy() -> str:
        forget_group(group)
        group.destroy()
        return f"Destroyed weight-update group '{body.group_name}'."

    return await _on_worker(state, destroy, refused="destroying the weight-update group failed")


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
