"""SGLang's `/get_weights_by_name`: one weight of the served engine as JSON numbers.

The run's `sync.check_weight_update_equal` reads every synced tensor back from every server with
it and requires the trainer's bits. Like SGLang, the answer is the tensor's first `truncate_size`
rows as nested lists; JSON numbers are Python floats (doubles), which hold fp32, bf16 and fp16
values exactly, so the reader casts them back to the served dtype without loss.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from miles_core.errors import MilesError
from miles_core.serve.bodies import parse_body
from miles_core.serve.schemas import Strict
from miles_core.serve.state import RequestError, ServeState

router = APIRouter()


class WeightsByNameBody(Strict):
    """SGLang `GetWeightsByNameReqInput`."""

    name: str
    truncate_size: int = 100


@router.api_route("/get_weights_by_name", methods=["GET", "POST"])
async def get_weights_by_name(request: Request):
    state: ServeState = request.app.state.serve
    body = await parse_body(request, WeightsByNameBody)
    if body.truncate_size < 1:
        raise RequestError(f"truncate_size must be >= 1, got {body.truncate_size}")
    read = getattr(state.engine, "get_weights_by_name", None)
    if read is None:
        raise RequestError(f"the served engine ({type(state.engine).__name__}) cannot report its weights", 501)
    try:
        tensor = await state.worker.control(lambda: read(body.name).detach().cpu())
    except MilesError as err:
        raise RequestError(str(err), 404) from None
    return (tensor[: body.truncate_size] if tensor.dim() else tensor).double().tolist()
