"""SGLang's memory routes: `/release_memory_occupation` and `/resume_memory_occupation`.

With `engine.colocate` the trainer shares the server's GPU: before it trains, the run asks the
server to release its memory (the native engine frees its KV pool and CUDA graphs and moves its
weights to pinned host memory, `NativeEngine.release_memory`) and to resume it before the next
rollout (the same weights, bitwise). Both run on the batching worker's thread, between batches.
The native engine releases everything at once: SGLang's `tags` (`weights`, `kv_cache`,
`cuda_graph`) are accepted only when they name all three (or are left out). Beyond SGLang's body,
`keep_weights: false` drops the weights instead of copying them to the host (what SGLang does
without `--enable-weights-cpu-backup`): the caller syncs every weight after the resume, and
generation is refused until it has. Release is refused
(409) while requests are in flight; generation is refused (409) while released. Beyond SGLang's
shape, a release answers the bytes it freed under `miles` (the run logs them). A release also lets go
of what the weight sync keeps between pushes: the mapping of the trainer's CUDA IPC buffer and the
flat-bucket receive buffers.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from miles_core.errors import MilesError
from miles_core.serve.bodies import parse_body
from miles_core.serve.schemas import Strict
from miles_core.serve.state import RequestError, ServeState
from miles_core.serve.distributed_weights import forget_receive_buffers
from miles_core.serve.weights import forget_ipc_mapping

router = APIRouter()
ALL_TAGS = frozenset({"weights", "kv_cache", "cuda_graph"})


class MemoryBody(Strict):
    """SGLang `ReleaseMemoryOccupationReqInput` / `ResumeMemoryOccupationReqInput`."""

    tags: list[str] | None = None
    keep_weights: bool = True
    """miles: false drops the weights at release (a full weight sync follows the resume)."""


async def _engine_call(request: Request, name: str, then=None, options=lambda body: {}):
    state: ServeState = request.app.state.serve
    body = await parse_body(request, MemoryBody)
    if body.tags is not None and set(body.tags) != ALL_TAGS:
        raise RequestError(f"tags {sorted(body.tags)}: the native engine releases and resumes "
                           f"{', '.join(sorted(ALL_TAGS))} together; send all three or none")
    method = getattr(state.engine, name, None)
    if method is None:
        raise RequestError(f"the served engine ({type(state.engine).__name__}) cannot {name}", 501)
    def call():
        result = method(**options(body))
        if then is not None:
            then()
        return result

    try:
        return await state.worker.control(call)
    except MilesError as err:  # in flight: the caller must wait or abort first
        raise RequestError(str(err), 409) from None


@router.api_route("/release_memory_occupation", methods=["GET", "POST"])
async def release_memory_occupation(request: Request):
    state: ServeState = request.app.state.serve

    def forget_sync_buffers() -> None:
        forget_ipc_mapping(state.engine)
        forget_receive_buffers(state.weight_groups)

    freed = await _engine_call(request, "release_memory", then=forget_sync_buffers,
                               options=lambda body: {"keep_weights": body.keep_weights})
    return {"success": True, "message": "Memory released.", "miles": freed}


@router.api_route("/resume_memory_occupation", methods=["GET", "POST"])
async def resume_memory_occupation(request: Request):
    await _engine_call(request, "resume_memory")
    return {"success": True, "message": "Memory resumed."}
