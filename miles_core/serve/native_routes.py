"""SGLang's native routes: `/generate` and the health, info, cache, pause, abort and weight routes.

Shapes follow SGLang 0.5 (`http_server.py`, `io_struct.py`): a batch answers a list in
prompt-major order (prompt i, sample j at `i * n + j`); `meta_info.finish_reason` is
`{"type": "stop", "matched": ...}`, `{"type": "length", "length": N}` or `{"type": "abort", ...}`;
`output_token_logprobs` holds `[logprob, token_id, text|null]` triples; `routed_experts` is base64
of int32 `(prompt + completion - 1, num_moe_layers, topk)`. Streaming (`stream: true`) sends
server-sent events `data: {...}` then `data: [DONE]`. With the native engine (`worker.streaming`)
an event is sent as tokens arrive, each holding the answer so far like SGLang's default
(cumulative `text` and `output_ids`, `finish_reason` null until the last event, which equals the
non-streamed answer); a client that disconnects aborts its requests in the engine. An engine
without `submit` (HTTP client) sends each answer as one event (the last one SGLang would send).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from miles_core.errors import MilesError
from miles_core.serve.bodies import error_response, parse_body
from miles_core.serve.schemas import (AbortBody, Empty, GenerateBody, PauseBody, SamplingParams, UpdateFromDiskBody,
                                      UpdateFromTensorBody)
from miles_core.serve.state import RequestError, ServeState
from miles_core.serve.weights import load_disk_weights, load_tensor_weights
from miles_core.serve.worker import Aborted

router = APIRouter()


def _state(request: Request) -> ServeState:
    return request.app.state.serve


# -- generate ------------------------------------------------------------------------------------
def _per_item(value, count: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != count:
            raise RequestError(f"{name} has {len(value)} entries for {count} prompts")
        return value
    return [value] * count


def _prompts(state: ServeState, body: GenerateBody) -> tuple[list[list[int]], bool]:
    """Token ids of every prompt, and whether the request was a batch."""
    if (body.text is None) == (body.input_ids is None):
        raise RequestError("give exactly one of text or input_ids")
    if body.text is not None:
        texts = body.text if isinstance(body.text, list) else [body.text]
        return [state.encode(t) for t in texts], isinstance(body.text, list)
    ids = body.input_ids
    if ids and isinstance(ids[0], list):
        return [list(row) for row in ids], True
    return [list(ids)], False


def build_jobs(state: ServeState, body: GenerateBody):
    """(engine requests, per-prompt sampling params, rids, is_batch) of a `/generate` body."""
    prompts, batch = _prompts(state, body)
    if not prompts:
        raise RequestError("the batch is empty")
    params = _per_item(body.sampling_params or SamplingParams(), len(prompts), "sampling_params")
    rids = _per_item(body.rid, len(prompts), "rid") if body.rid is not None else [None] * len(prompts)
    rids = [rid or f"miles-{time.monotonic_ns():x}-{i}" for i, rid in enumerate(rids)]
    for name in ("return_logprob", "logprob_start_len", "top_logprobs_num"):
        _per_item(getattr(body, name), len(prompts), name)
    if any(_per_item(body.top_logprobs_num, len(prompts), "top_logprobs_num")):
        raise RequestError("top_logprobs_num > 0 is not supported by miles serve")
    requests = [state.request(ids, p, rid=rid) for ids, p, rid in zip(prompts, params, rids)]
    return requests, params, rids, batch


def output_json(state: ServeState, gen, params, *, rid: str, logprob: bool, text_in_logprobs: bool,
                experts: bool, latency: float) -> dict:
    """One SGLang `/generate` answer."""
    meta = {
        "id": rid, "finish_reason": dict(gen.finish_reason), "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": len(gen.output_ids), "cached_tokens": 0,
        "weight_version": gen.weight_version, "e2e_latency": latency,
    }
    if logprob:
        texts = [state.tokenizer.decode([t]) for t in gen.output_ids] if text_in_logprobs else [None] * len(gen.output_ids)
        meta["output_token_logprobs"] = [[lp, tok, txt] for lp, tok, txt in zip(gen.output_logprobs, gen.output_ids, texts)]
    if experts and gen.routed_experts is not None:
        meta["routed_experts"] = base64.b64encode(np.ascontiguousarray(gen.routed_experts, dtype=np.int32).tobytes()).decode()
    return {"text": state.text_of(gen, params), "output_ids": list(gen.output_ids), "meta_info": meta}


def abort_json(rid: str, message: str) -> dict:
    finish = {"type": "abort", "message": message, "status_code": 200, "err_type": None}
    return {"text": "", "output_ids": [], "meta_info": {"id": rid, "finish_reason": finish, "prompt_tokens": 0,
                                                       "completion_tokens": 0, "cached_tokens": 0}}


async def run_generate(state: ServeState, body: GenerateBody) -> tuple[list[dict], bool]:
    requests, params, rids, batch = build_jobs(state, body)
    logprob = _per_item(body.return_logprob, len(requests), "return_logprob")
    start = time.perf_counter()
    try:
        outputs = await state.worker.generate(requests)
    except Aborted as err:
        return [abort_json(rid, str(err)) for rid, r in zip(rids, requests)
                for _ in range(r.sampling.n_samples_per_prompt)], batch
    latency = time.perf_counter() - start
    answers = [
        output_json(state, gen, p, rid=rid, logprob=lp, text_in_logprobs=body.return_text_in_logprobs,
                    experts=body.return_routed_experts, latency=latency)
        for gens, p, rid, lp in zip(outputs, params, rids, logprob) for gen in gens
    ]
    return answers, batch


@router.api_route("/generate", methods=["POST", "PUT"])
async def generate(request: Request):
    state = _state(request)
    body = await parse_body(request, GenerateBody)
    if body.stream:
        build_jobs(state, body)  # bad input answers 400 before the stream starts
        return StreamingResponse(_stream(state, body, request), media_type="text/event-stream")
    answers, batch = await run_generate(state, body)
    return JSONResponse(answers if batch or len(answers) > 1 else answers[0])


async def _stream(state: ServeState, body: GenerateBody, request: Request):
    try:
        if state.worker.streaming:
            async for answer in _token_answers(state, body, request):
                yield f"data: {json.dumps(answer)}\n\n"
        else:
            answers, batch = await run_generate(state, body)
            for index, answer in enumerate(answers):
                if batch or len(answers) > 1:
                    answer["index"] = index
                yield f"data: {json.dumps(answer)}\n\n"
    except (RequestError, MilesError) as err:  # MilesError: the engine refused the request (pool too small)
        yield f"data: {json.dumps({'error': {'message': str(err), 'code': getattr(err, 'status', 400)}})}\n\n"
    yield "data: [DONE]\n\n"


async def _token_answers(state: ServeState, body: GenerateBody, request: Request):
    """SGLang stream events as tokens arrive: the answer so far, then the final answer."""
    requests, params, rids, batch = build_jobs(state, body)
    logprob = _per_item(body.return_logprob, len(requests), "return_logprob")
    indexed = batch or sum(r.sampling.n_samples_per_prompt for r in requests) > 1
    start = time.perf_counter()
    async for updates in state.worker.stream(requests, request.is_disconnected):
        for update in updates:
            i, latency = update.request_index, time.perf_counter() - start
            if update.generation is not None:
                answer = output_json(state, update.generation, params[i], rid=rids[i], logprob=logprob[i],
                                     text_in_logprobs=body.return_text_in_logprobs,
                                     experts=body.return_routed_experts, latency=latency)
            else:
                answer = _partial_json(state, update, params[i], rid=rids[i], logprob=logprob[i],
                                       text_in_logprobs=body.return_text_in_logprobs,
                                       prompt_tokens=len(requests[i].input_ids), latency=latency)
            if indexed:
                answer["index"] = update.index
            yield answer


def _partial_json(state: ServeState, update, params, *, rid: str, logprob: bool, text_in_logprobs: bool,
                  prompt_tokens: int, latency: float) -> dict:
    """An unfinished answer as SGLang streams it (no finish reason yet; routed experts come last)."""
    ids = update.output_ids
    meta = {"id": rid, "finish_reason": None, "prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
            "cached_tokens": 0, "weight_version": state.engine.weight_version, "e2e_latency": latency}
    if logprob:
        texts = [state.tokenizer.decode([t]) for t in ids] if text_in_logprobs else [None] * len(ids)
        meta["output_token_logprobs"] = [[lp, tok, txt] for lp, tok, txt in zip(update.output_logprobs, ids, texts)]
    text = state.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
    return {"text": text, "output_ids": list(ids), "meta_info": meta}


# -- health and info -----------------------------------------------------------------------------
@router.get("/health")
async def health(request: Request):
    if not _state(request).worker.alive:
        return error_response("the engine worker has stopped", 503)
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(request: Request):
    state = _state(request)
    if state.worker.paused:
        return Response(status_code=200)
    request_ = state.request([0], SamplingParams(max_new_tokens=1, temperature=0.0), rid="health")
    try:
        await asyncio.wait_for(state.worker.generate([request_]), timeout=30)
    except (TimeoutError, asyncio.TimeoutError, Aborted) as err:
        return error_response(f"one-token generation failed ({type(err).__name__}: {err})", 503)
    return Response(status_code=200)


def model_info(state: ServeState) -> dict:
    return {"model_path": state.facts.model_path, "served_model_name": state.model_name,
            "tokenizer_path": state.facts.model_path, "is_generation": True, "preferred_sampling_params": None,
            "weight_version": state.engine.weight_version, "load_format": None,
            "model_type": state.facts.hf_config.get("model_type"),
            "architectures": state.facts.hf_config.get("architectures")}


@router.get("/get_model_info")
@router.get("/model_info")
async def get_model_info(request: Request):
    return model_info(_state(request))


@router.get("/get_server_info")
@router.get("/server_info")
async def get_server_info(request: Request):
    from miles_core import __version__

    state = _state(request)
    return {"model_path": state.facts.model_path, "served_model_name": state.model_name,
            "tokenizer_path": state.facts.model_path, "max_context_length": state.facts.max_context_len,
            "version": f"miles-{__version__}", "host": state.options.host, "port": state.options.port,
            "max_running_requests": state.worker.max_batch_size, "internal_states": [],
            "miles": {"version": __version__, "per_sample_seeds": True}}


# -- control -------------------------------------------------------------------------------------
@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request):
    await _state(request).worker.control(_state(request).engine.flush_cache)
    return Response("Cache flushed.\n", status_code=200)


@router.post("/pause_generation")
async def pause_generation(request: Request):
    state, body = _state(request), await parse_body(request, PauseBody)
    state.worker.pause()
    if body.mode == "abort":
        state.worker.abort(abort_all=True)
    return {"message": "Generation paused successfully.", "status": "ok"}


@router.post("/continue_generation")
async def continue_generation(request: Request):
    await parse_body(request, Empty)
    _state(request).worker.resume()
    return {"message": "Generation continued successfully.", "status": "ok"}


@router.post("/abort_request")
async def abort_request(request: Request):
    body = await parse_body(request, AbortBody)
    _state(request).worker.abort(body.rid, abort_all=body.abort_all)
    return Response(status_code=200)


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(request: Request):
    state, body = _state(request), await parse_body(request, UpdateFromDiskBody)
    path = state.check_weights_path(body.model_path)
    return await _update(state, lambda: load_disk_weights(state.engine, path, body.weight_version, body.flush_cache),
                         body.abort_all_requests, extra={"num_paused_requests": 0})


@router.post("/update_weights_from_tensor")
async def update_weights_from_tensor(request: Request):
    state, body = _state(request), await parse_body(request, UpdateFromTensorBody)
    return await _update(state, lambda: load_tensor_weights(state.engine, body.serialized_named_tensors,
                                                            body.weight_version, body.flush_cache, body.load_format),
                         body.abort_all_requests)


async def _update(state: ServeState, load, abort_all: bool, extra: dict | None = None):
    try:
        message = await state.worker.control(load, alone=abort_all)
    except RequestError as err:
        # SGLang's shape (success, message) plus the error shape every other route answers
        return JSONResponse({"success": False, "message": str(err), **(extra or {}),
                             "error": {"message": str(err), "code": err.status}}, status_code=err.status)
    return {"success": True, "message": message, "weight_version": state.engine.weight_version, **(extra or {})}
