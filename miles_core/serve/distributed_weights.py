"""One bucket of SGLang's distributed weight update, on the server: its body
(`UpdateWeightsFromDistributedReqInput`), the checks made before any broadcast, the receive and
the engine's update. Shared by the HTTP route (`weight_routes.py`) and the local weight channel
(`weight_channel.py`), so a bucket is received and refused alike either way.

A bucket is received whole into tensors of the announced dtypes and shapes on the engine's device
before anything is checked, so a bucket the engine refuses (unknown name, wrong shape) still
takes part in every broadcast and the group stays in step; the engine checks every name and shape
before it writes any, so a refused bucket leaves the old weights in place. A flat bucket lands in
one byte buffer per group, reused bucket after bucket with its views cached per signature
(`flat.FlatReceiver`: the engine copies a bucket out before the next is received, and ~300
per-tensor views cost ~1 ms a bucket); a memory release frees it. A malformed request (unknown
dtype, lists of different lengths, unknown group) is refused before any broadcast: the sender
cannot be in step with it anyway.
"""

from __future__ import annotations

import weakref

import torch

from miles_core.errors import MilesError
from miles_core.serve.schemas import Strict
from miles_core.serve.state import RequestError, ServeState
from miles_core.sync import flat as flat_bucket
from miles_core.sync.group import DTYPES, WeightGroup, parse_dtype

REFUSED = "weights from the distributed group refused"
"""How a refused bucket's message begins, over HTTP and over the local channel."""
REFUSALS = (RequestError, MilesError, RuntimeError, ValueError)
"""What `refusal` answers; anything else is the server's own failure (500)."""
_DTYPES = {**DTYPES, **{f"torch.{name}": dtype for name, dtype in DTYPES.items()}}
"""Every dtype name `parse_dtype` takes."""
_RECEIVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Group -> the `FlatReceiver` of its flat buckets (weak: it goes with the group)."""


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


def announced(state: ServeState, body: DistributedBody) -> tuple[WeightGroup, list[torch.dtype]]:
    """The bucket's group and dtypes, once the group exists, its three lists agree and every dtype
    and shape is usable."""
    group = state.weight_groups.get(body.group_name)
    if group is None:
        raise RequestError(f"no weight-update group '{body.group_name}' (POST /init_weights_update_group first)")
    if body.load_format not in (None, flat_bucket.LOAD_FORMAT):
        raise RequestError(f"load_format '{body.load_format}' is not supported here; expected none (a broadcast "
                           f"per tensor) or '{flat_bucket.LOAD_FORMAT}' (one broadcast of the bucket's bytes)")
    if not len(body.names) == len(body.dtypes) == len(body.shapes):
        raise RequestError(f"names, dtypes and shapes have {len(body.names)}, {len(body.dtypes)} and "
                           f"{len(body.shapes)} entries; expected one each per tensor")
    dtypes = list(map(_DTYPES.get, body.dtypes))  # C-level passes: a bucket has ~300 tensors, each push
    if None in dtypes:
        bad = dtypes.index(None)
        try:
            parse_dtype(body.dtypes[bad], f"tensor '{body.names[bad]}'")
        except MilesError as err:
            raise RequestError(str(err)) from None
    if min(map(min, filter(None, body.shapes)), default=0) < 0:
        name, shape = next((n, s) for n, s in zip(body.names, body.shapes) if s and min(s) < 0)
        raise RequestError(f"tensor '{name}' has shape {shape}; sizes must be >= 0")
    return group, dtypes


def receive_bucket(state: ServeState, group: WeightGroup, body: DistributedBody, dtypes: list[torch.dtype]) -> str:
    """Receive the bucket from the group and load it into the engine (between the worker's
    batches); the success message, or `RequestError` when the engine refuses it."""
    device = getattr(state.engine, "device", torch.device("cpu"))
    tensors = _received(group, device, dtypes, body.shapes, flat=body.load_format == flat_bucket.LOAD_FORMAT)
    version = state.engine.weight_version if body.weight_version is None else body.weight_version
    try:
        state.engine.update_weights(zip(body.names, tensors), version=version)
    except MilesError as err:
        raise RequestError(f"{err}; the old weights are kept") from None
    if body.flush_cache:
        state.engine.flush_cache()
    return f"Succeeded to update model weights from the distributed group (weight_version {version})."


def refusal(err: Exception, refused: str) -> RequestError:
    """SGLang's `{success: false, message}` (400) for a failed group or weight call (gloo and NCCL
    failures are RuntimeErrors)."""
    return RequestError(f"{refused}: {err}".replace("\n", " "))


def forget_receive_buffers(groups: dict[str, WeightGroup]) -> None:
    """Free the flat-bucket buffers of `groups` (the engine releases its memory); the next bucket
    allocates again."""
    for group in groups.values():
        forget_group(group)


def forget_group(group: WeightGroup) -> None:
    """Free `group`'s flat-bucket buffer (it is destroyed, or the engine releases its memory)."""
    _RECEIVERS.pop(group, None)


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
