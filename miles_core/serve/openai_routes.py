"""OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Chat prompts go through the tokenizer's chat template (with `add_generation_prompt`). Streaming
answers are server-sent `chat.completion.chunk` / `text_completion` events ending in
`data: [DONE]`. With the native engine (`worker.streaming`) each choice's text arrives in `delta`
pieces as tokens are sampled (their concatenation is the non-streamed text; log-probs, when asked,
come with the choice's last piece); an engine without `submit` sends each choice in one chunk.
`logprobs` (chat: true; completions: 0) return the sampled
tokens' log-probs; top alternatives are not computed.
"""

from __future__ import annotations

import inspect
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from miles_core.errors import MilesError
from miles_core.serve.bodies import parse_body
from miles_core.serve.schemas import ChatBody, CompletionBody, SamplingParams
from miles_core.serve.state import RequestError, ServeState
from miles_core.serve.worker import Aborted

router = APIRouter()


def _finish(gen) -> str:
    return {"stop": "stop", "length": "length"}.get(gen.finish_reason.get("type"), "abort")


def _params(state: ServeState, body, max_tokens: int | None) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return SamplingParams(max_new_tokens=max_tokens or state.facts.max_context_len, stop=stop,
                          temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, n=body.n,
                          no_stop_trim=body.no_stop_trim, skip_special_tokens=body.skip_special_tokens,
                          sampling_seed=body.seed)


def _usage(prompts: list[list[int]], outputs) -> dict:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(g.output_ids) for gens in outputs for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _run(state: ServeState, prompts: list[list[int]], params: SamplingParams, prefix: str):
    requests = [state.request(ids, params, rid=f"{prefix}-{uuid.uuid4().hex}") for ids in prompts]
    try:
        return await state.worker.generate(requests)
    except Aborted as err:
        raise RequestError(f"request aborted: {err}", 503) from None


def _sse(events) -> StreamingResponse:
    async def body():
        for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


# -- models --------------------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: Request):
    state: ServeState = request.app.state.serve
    card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "miles",
            "root": state.facts.model_path, "max_model_len": state.facts.max_context_len}
    return {"object": "list", "data": [card]}


# -- completions ---------------------------------------------------------------------------------
def _completion_prompts(state: ServeState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [state.encode(prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [state.encode(p) for p in prompt]
    if prompt and isinstance(prompt[0], list):
        return [list(p) for p in prompt]
    return [list(prompt)]


@router.post("/v1/completions")
async def completions(request: Request):
    state: ServeState = request.app.state.serve
    body = await parse_body(request, CompletionBody)
    prompts = _completion_prompts(state, body.prompt)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    if body.stream and state.worker.streaming:
        return _token_sse(state, request, prompts, _params(state, body, body.max_tokens), "cmpl",
                          _completion_events(state, base, body))
    outputs = await _run(state, prompts, _params(state, body, body.max_tokens), "cmpl")
    choices = []
    for gens in outputs:
        for gen in gens:
            choices.append(_completion_choice(state, body, gen, len(choices)))
    if body.stream:
        return _sse([{**base, "object": "text_completion", "choices": [c]} for c in choices])
    return {**base, "object": "text_completion", "choices": choices, "usage": _usage(prompts, outputs)}


def _completion_choice(state: ServeState, body, gen, index: int, text: str | None = None) -> dict:
    logprobs = None
    if body.logprobs is not None:
        tokens = [state.tokenizer.decode([t]) for t in gen.output_ids]
        logprobs = {"tokens": tokens, "token_logprobs": list(gen.output_logprobs),
                    "top_logprobs": [None] * len(tokens), "text_offset": []}
    if text is None:
        text = state.text_of(gen, _params(state, body, body.max_tokens))
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": _finish(gen)}


def _completion_events(state: ServeState, base: dict, body):
    """(index, delta, gen|None) -> text_completion chunks; None -> the usage-free end (no events)."""
    def events(index: int, delta: str, gen, usage: dict | None) -> list[dict]:
        if usage is not None:
            return []
        choice = (_completion_choice(state, body, gen, index, text=delta) if gen is not None else
                  {"index": index, "text": delta, "logprobs": None, "finish_reason": None})
        return [{**base, "object": "text_completion", "choices": [choice]}]
    return events


# -- chat ----------------------------------------------------------------------------------------
def _text_of(content, number: int) -> str:
    if not isinstance(content, list):
        return content or ""
    parts = [part.get("text", "") for part in content if part.get("type") == "text"]
    if not all(isinstance(text, str) for text in parts):
        raise RequestError(f"messages.{number}.content: a text part's 'text' must be a string")
    return "".join(parts)


def _chat_prompt(state: ServeState, body: ChatBody) -> list[int]:
    messages = [{**m.model_dump(exclude_none=True), "content": _text_of(m.content, k)} for k, m in enumerate(body.messages)]
    if not getattr(state.tokenizer, "chat_template", None):
        raise RequestError("the served model's tokenizer has no chat template; use /v1/completions")
    kwargs = body.chat_template_kwargs or {}
    reserved = sorted(set(kwargs) & (set(inspect.signature(state.tokenizer.apply_chat_template).parameters) | {"messages"}))
    if reserved:
        raise RequestError(f"chat_template_kwargs may not set {reserved[0]!r}; expected template variables "
                           "such as enable_thinking")
    try:  # the template is code run on user input: it may raise anything (jinja's raise_exception, TypeError)
        encoded = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - any template failure is a bad request, not a server error
        raise RequestError(f"the chat template cannot render these messages: {type(err).__name__}: {err}") from None
    return [int(i) for i in encoded["input_ids"]]


def _chat_logprobs(state: ServeState, gen) -> dict:
    content = []
    for token, logprob in zip(gen.output_ids, gen.output_logprobs):
        text = state.tokenizer.decode([token])
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []})
    return {"content": content}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state: ServeState = request.app.state.serve
    body = await parse_body(request, ChatBody)
    prompt = _chat_prompt(state, body)
    params = _params(state, body, body.max_completion_tokens or body.max_tokens)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    if body.stream and state.worker.streaming:
        return _token_sse(state, request, [prompt], params, "chatcmpl",
                          _chat_events(state, base, logprobs=bool(body.logprobs), include_usage=include_usage))
    outputs = await _run(state, [prompt], params, "chatcmpl")
    choices = [{"index": j, "message": {"role": "assistant", "content": state.text_of(gen, params)},
                "logprobs": _chat_logprobs(state, gen) if body.logprobs else None, "finish_reason": _finish(gen)}
               for j, gen in enumerate(outputs[0])]
    usage = _usage([prompt], outputs)
    if body.stream:
        return _sse(_chat_chunks(base, choices, usage, include_usage=include_usage))
    return {**base, "object": "chat.completion", "choices": choices, "usage": usage}


def _chat_chunks(base: dict, choices: list[dict], usage: dict, *, include_usage: bool) -> list[dict]:
    chunk = {**base, "object": "chat.completion.chunk"}
    events = []
    for c in choices:
        delta = {"role": "assistant", "content": c["message"]["content"]}
        events.append({**chunk, "choices": [{"index": c["index"], "delta": delta, "logprobs": c["logprobs"],
                                             "finish_reason": None}]})
        events.append({**chunk, "choices": [{"index": c["index"], "delta": {}, "logprobs": None,
                                             "finish_reason": c["finish_reason"]}]})
    if include_usage:
        events.append({**chunk, "choices": [], "usage": usage})
    return events


def _chat_events(state: ServeState, base: dict, *, logprobs: bool, include_usage: bool):
    """(index, delta, gen|None, usage|None) -> chat.completion.chunk events."""
    chunk = {**base, "object": "chat.completion.chunk"}
    started: set[int] = set()

    def events(index: int, delta: str, gen, usage: dict | None) -> list[dict]:
        if usage is not None:
            return [{**chunk, "choices": [], "usage": usage}] if include_usage else []
        message = {"content": delta} if index in started else {"role": "assistant", "content": delta}
        started.add(index)
        out = [{**chunk, "choices": [{"index": index, "delta": message, "finish_reason": None,
                                      "logprobs": _chat_logprobs(state, gen) if logprobs and gen else None}]}]
        if gen is not None:
            out.append({**chunk, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                              "finish_reason": _finish(gen)}]})
        return out
    return events


def _token_sse(state: ServeState, request: Request, prompts: list[list[int]], params: SamplingParams, prefix: str,
               events) -> StreamingResponse:
    """Stream `delta` text pieces of every choice as the native engine samples them.

    A piece is only sent once it cannot change: the newest token is held back (it may be a stop
    token the engine has not marked yet, which the final text leaves out), as are text ending in a
    partial UTF-8 character and the last characters that could begin a stop string. The rest of
    the final text follows when the choice finishes, so the pieces add up to the plain answer."""
    requests = [state.request(ids, params, rid=f"{prefix}-{uuid.uuid4().hex}") for ids in prompts]
    hold = max((len(s) for s in params.stop or ()), default=0) if not isinstance(params.stop, str) else len(params.stop)

    async def body():
        shown: dict[int, str] = {}
        finals = [[] for _ in requests]
        try:
            async for updates in state.worker.stream(requests, request.is_disconnected):
                for u in updates:
                    sent = shown.get(u.index, "")
                    if u.generation is not None:
                        finals[u.request_index].append(u.generation)
                        text = state.text_of(u.generation, params)
                    else:
                        text = state.tokenizer.decode(u.output_ids[:-1], skip_special_tokens=params.skip_special_tokens)
                        if text.endswith("\ufffd") or not text.startswith(sent):
                            continue
                        text = text[:max(len(sent), len(text) - hold)]
                    delta = text[len(sent):] if text.startswith(sent) else text
                    if delta or u.generation is not None:
                        shown[u.index] = text
                        for event in events(u.index, delta, u.generation, None):
                            yield f"data: {json.dumps(event)}\n\n"
            for event in events(0, "", None, _usage(prompts, finals)):
                yield f"data: {json.dumps(event)}\n\n"
        except MilesError as err:  # the engine refused the request (e.g. the KV pool is too small)
            yield f"data: {json.dumps({'error': {'message': str(err), 'code': 400}})}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")
