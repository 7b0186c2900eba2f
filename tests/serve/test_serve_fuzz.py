"""Fuzz every HTTP route of `miles serve` (issue 21, item 8): random JSON, well-typed but wrong
bodies derived from each route's pydantic schema, raw bytes, oversize bodies and wrong methods
get only the codes the README documents for that route, always with the error shape
`{"error": {"message", "code"}}`; valid bodies get 2xx; the server answers `/health` after.

Routes are read from the app itself, so a new route fails `test_every_route_has_a_fuzz_spec`
until it gets a row in SPECS. One tiny-qwen3 server per module, context 64 and a 4 KiB body
limit, so every generation and every oversize body stays cheap.
"""

from __future__ import annotations

import base64
import json
import string
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from safetensors.torch import save as save_safetensors

from miles_core.serve import ServeOptions
from miles_core.serve.app import create_app
from miles_core.serve.state import RequestError
from miles_core.serve.schemas import (AbortBody, ChatBody, CompletionBody, Empty, GenerateBody, PauseBody,
                                      UpdateFromDiskBody, UpdateFromTensorBody)
from miles_core.serve.memory_routes import ALL_TAGS, MemoryBody
from miles_core.serve.readback_routes import WeightsByNameBody
from miles_core.serve.distributed_weights import DistributedBody
from miles_core.serve.weight_routes import ChecksumBody, DestroyGroupBody, InitGroupBody
from tests.serve.conftest import start, with_options

MAX_BYTES = 4096
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]
FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def app_routes(app) -> dict[str, frozenset[str]]:
    """path -> methods of every route the app serves (FastAPI >= 0.165 nests included routers)."""
    routes: dict[str, frozenset[str]] = {}
    for route in app.routes:
        if hasattr(route, "original_router"):
            prefix = route.include_context.prefix
            for path, methods in app_routes(route.original_router).items():
                routes[prefix + path] = methods
        elif hasattr(route, "methods"):
            routes[route.path] = frozenset(route.methods)
    return routes


ROUTES = app_routes(create_app(types.SimpleNamespace(options=ServeOptions())))

# -- strategies ----------------------------------------------------------------------------------
strings = st.text(max_size=12) | st.sampled_from(["\ud800", "a\x00b", "\udfff"])  # lone surrogates: JSON escapes them
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | strings
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
ints = st.sampled_from([-2**70, -2**63, -1, 0, 1, 2, 319, 320, 2**31, 2**63, 2**70]) | st.integers(-3, 400)


def typed(annotation) -> st.SearchStrategy:
    """Values of a field's type with its range ignored: well-typed, often wrong."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return st.one_of(*map(typed, args))
    if origin is Literal:
        return st.sampled_from(args) | st.text(max_size=8)
    if origin is list:
        return st.lists(typed(args[0]), max_size=3)
    if origin is dict:  # keys that mean something somewhere: template variables, reserved arguments
        keys = st.sampled_from(["tokenize", "messages", "enable_thinking", "include_usage", "type", "text"]) | strings
        return st.dictionaries(keys, json_values, max_size=3)
    if annotation is Any:
        return json_values
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return schema_bodies(annotation)
    return {int: ints, float: st.floats(), str: strings, bool: st.booleans(),
            type(None): st.none()}[annotation]


def schema_bodies(model: type[BaseModel]) -> st.SearchStrategy:
    """Bodies with the model's fields (any may be missing) holding typed or random values, and
    sometimes an unknown field."""
    fields = {name: typed(f.annotation) | json_values for name, f in model.model_fields.items()}
    extra = st.dictionaries(st.sampled_from(["unknown", "temperatur", "text_"]), json_values, max_size=1)
    return st.builds(lambda d, e: {**d, **e}, st.fixed_dictionaries({}, optional=fields), extra)


def one_field_wrong(valid: st.SearchStrategy, model: type[BaseModel]) -> st.SearchStrategy:
    """A valid body with one field replaced by a typed or random value: reaches past the schema."""
    fields = {name: typed(f.annotation) | json_values for name, f in model.model_fields.items()}
    if not fields:
        return st.nothing()
    return st.tuples(valid, st.sampled_from(sorted(fields))).flatmap(
        lambda pair: fields[pair[1]].map(lambda value: {**pair[0], pair[1]: value}))


token_ids = st.lists(st.integers(0, 255), min_size=1, max_size=8)
texts = st.text(alphabet=string.printable, min_size=1, max_size=12)  # fits the context of 64
sampling = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 400), "n": st.integers(1, 2), "stop": st.none() | texts | st.lists(texts, max_size=2),
    "stop_token_ids": st.lists(st.integers(0, 255), max_size=2), "no_stop_trim": st.booleans(),
    "skip_special_tokens": st.booleans(), "sampling_seed": st.integers(0, 2**62)})
generate_bodies = st.fixed_dictionaries(
    {"sampling_params": sampling},
    optional={"return_logprob": st.booleans(), "return_text_in_logprobs": st.booleans(), "stream": st.booleans(),
              "rid": st.text(max_size=8), "return_routed_experts": st.booleans()},
).flatmap(lambda body: st.one_of(st.builds(lambda p: {**body, "text": p}, texts),
                                 st.builds(lambda p: {**body, "input_ids": p}, token_ids),
                                 st.builds(lambda p: {**body, "input_ids": p, "rid": None},
                                           st.lists(token_ids, min_size=1, max_size=3))))
openai = {"max_tokens": st.integers(1, 4), "n": st.integers(1, 2), "temperature": st.floats(0, 2),
          "seed": st.integers(0, 2**62), "stop": st.none() | texts, "stream": st.booleans(), "model": st.text(max_size=8)}
completion_bodies = st.fixed_dictionaries({"prompt": texts | token_ids | st.lists(texts, min_size=1, max_size=2),
                                           "max_tokens": st.integers(1, 4)},
                                          optional={k: v for k, v in openai.items() if k != "max_tokens"})
chat_bodies = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": texts}), min_size=1, max_size=2),
     "max_tokens": st.integers(1, 4)},
    optional={"logprobs": st.booleans(), **{k: v for k, v in openai.items() if k != "max_tokens"}})
no_body = st.none()


@dataclass(frozen=True)
class Spec:
    """How to fuzz one route: bodies that must get 2xx, the schema wrong bodies come from (None:
    the route reads no body), and the codes it may answer to bad input (besides 405 and 413)."""

    valid: st.SearchStrategy
    schema: type[BaseModel] | None
    errors: frozenset[int] = frozenset()
    ok: frozenset[int] = frozenset({200})


def _tensor_bodies(state) -> st.SearchStrategy:
    norm = state.engine.model.state_dict()["model.norm.weight"]
    blob = base64.b64encode(save_safetensors({"model.norm.weight": norm.clone()})).decode()
    return st.fixed_dictionaries({"serialized_named_tensors": st.sampled_from([[], [blob]])},
                                 optional={"weight_version": st.text(max_size=8), "flush_cache": st.booleans()})


def specs(state) -> dict[str, Spec]:
    info = Spec(no_body, None)
    memory = Spec(st.fixed_dictionaries({}, optional={"tags": st.just(sorted(ALL_TAGS)), "keep_weights": st.booleans()}),
                  MemoryBody,
                  frozenset({400}))
    weight = st.fixed_dictionaries({"name": st.sampled_from(["model.norm.weight", "lm_head.weight"])},
                                   optional={"truncate_size": st.integers(1, 3)})
    disk = st.fixed_dictionaries({"model_path": st.just(state.facts.model_path)},
                                 optional={"weight_version": st.text(max_size=8), "flush_cache": st.booleans(),
                                           "abort_all_requests": st.booleans()})
    return {
        "/generate": Spec(generate_bodies, GenerateBody, frozenset({400})),
        "/health": info, "/health_generate": Spec(no_body, None, frozenset({503})),
        "/model_info": info, "/get_model_info": info, "/server_info": info, "/get_server_info": info,
        "/flush_cache": info, "/v1/models": info,
        "/pause_generation": Spec(st.fixed_dictionaries({}, optional={"mode": st.sampled_from(["abort", "retract",
                                                                                                 "in_place"])}),
                                  PauseBody, frozenset({400})),
        "/continue_generation": Spec(st.just({}), Empty, frozenset({400})),
        "/abort_request": Spec(st.fixed_dictionaries({}, optional={"rid": st.text(max_size=8),
                                                                   "abort_all": st.booleans()}),
                               AbortBody, frozenset({400})),
        "/update_weights_from_disk": Spec(disk, UpdateFromDiskBody, frozenset({400, 403})),
        "/update_weights_from_tensor": Spec(_tensor_bodies(state), UpdateFromTensorBody, frozenset({400})),
        "/release_memory_occupation": memory, "/resume_memory_occupation": memory,
        "/get_weights_by_name": Spec(weight, WeightsByNameBody, frozenset({400, 404})),
        "/v1/completions": Spec(completion_bodies, CompletionBody, frozenset({400})),
        "/v1/chat/completions": Spec(chat_bodies, ChatBody, frozenset({400})),
        # no peer to join here: joining answers 400 (CPU engine and nccl, or no store at that port)
        "/init_weights_update_group": Spec(st.fixed_dictionaries({
            "master_address": st.just("127.0.0.1"), "master_port": st.just(1), "rank_offset": st.just(1),
            "world_size": st.just(2), "backend": st.sampled_from(["nccl", "gloo"])}), InitGroupBody,
            frozenset({400, 409}), ok=frozenset()),
        "/update_weights_from_distributed": Spec(st.fixed_dictionaries({
            "names": st.just(["model.norm.weight"]), "dtypes": st.just(["float32"]), "shapes": st.just([[64]])}),
            DistributedBody, frozenset({400}), ok=frozenset()),
        "/destroy_weights_update_group": Spec(st.just({}), DestroyGroupBody, frozenset({400}), ok=frozenset()),
        "/weights_checksum": Spec(st.just({"names": ["model.norm.weight"]}), ChecksumBody, frozenset({400})),
        "/weight_channel": info,  # reads no body; opens the local weight channel once
    }


def requests_for(spec: Spec, methods: frozenset[str]) -> st.SearchStrategy:
    """(kind, method, body bytes or None, chunked) for one route."""
    allowed = sorted(methods)
    dump = lambda value: json.dumps(value, allow_nan=True).encode()  # noqa: E731 - NaN is fuzz input too
    valid = st.tuples(st.just("valid"), st.sampled_from(allowed), spec.valid.map(lambda b: None if b is None else dump(b)),
                      st.just(False))
    wrong = (schema_bodies(spec.schema) | one_field_wrong(spec.valid, spec.schema) if spec.schema else json_values).map(dump)
    raw = st.binary(max_size=64) | st.sampled_from([b"{", b"[]", b"null", b"\xff\xfe", b'{"a": 1', b"NaN", b"1e999"])
    huge = st.integers(MAX_BYTES + 1, 4 * MAX_BYTES).map(lambda n: b"[" + b"1," * (n // 2) + b"1]")
    return st.one_of(
        valid,
        st.tuples(st.just("wrong"), st.sampled_from(allowed), json_values.map(dump) | wrong | raw, st.just(False)),
        st.tuples(st.just("huge"), st.sampled_from(allowed), huge, st.booleans()),
        st.tuples(st.just("method"), st.sampled_from([m for m in METHODS if m not in methods]), wrong | raw,
                  st.just(False)),
    )


# -- the server and the checks -------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzzed():
    state, thread = start(overrides=["engine.max_context_len=64"], allow_unauthenticated_weight_updates=True,
                          max_request_bytes=MAX_BYTES)
    with thread as url, httpx.Client(base_url=url, timeout=60) as http:
        yield http, state
        assert http.get("/health").status_code == 200


def send(http: httpx.Client, method: str, path: str, body: bytes | None, chunked: bool) -> httpx.Response:
    content = (iter([body[i:i + 1024] for i in range(0, len(body), 1024)]) if chunked and body else body)
    try:
        return http.request(method, path, content=content, headers={"content-type": "application/json"})
    finally:
        if path == "/pause_generation":  # a paused server would leave the next generation waiting
            http.post("/continue_generation")
        if path == "/release_memory_occupation":  # a released server refuses the next generation
            http.post("/resume_memory_occupation")


def rewrite_if_dropped(http: httpx.Client, state, answer: httpx.Response) -> None:
    """A valid body may ask to drop the weights (`keep_weights: false`): write them back from the
    checkpoint, as a run's sync would, so the routes fuzzed next find a working server."""
    if not answer.json()["miles"]["weights_dropped_bytes"]:
        return
    with_options(state, allowed_model_roots=(str(Path(state.facts.model_path).parent),))
    try:
        body = {"model_path": state.facts.model_path, "weight_version": state.engine.weight_version}
        assert http.post("/update_weights_from_disk", json=body).status_code == 200
    finally:
        with_options(state, allowed_model_roots=())


def check(answer: httpx.Response, kind: str, path: str, spec: Spec, chunked: bool) -> None:
    status = answer.status_code
    context = (kind, path, status, answer.text[:300])
    if kind == "huge" and not chunked:
        assert status == 413, context  # Content-Length is checked before the route is even looked up
    elif kind == "method":
        assert status == 405, context
    elif kind == "valid":
        assert status in (spec.ok or spec.errors), context
    elif kind == "huge":
        assert status in spec.ok | spec.errors | {413}, context
    else:
        assert status in spec.ok | spec.errors, context
    if status >= 400:
        assert answer.headers["content-type"].startswith("application/json"), context
        error = answer.json()["error"]
        assert error["code"] == status and isinstance(error["message"], str) and error["message"], context
    elif answer.headers.get("content-type", "").startswith("application/json"):
        answer.json()


def test_every_route_has_a_fuzz_spec(fuzzed):
    _, state = fuzzed
    missing = sorted(set(ROUTES) - set(specs(state)))
    assert not missing, f"routes with no fuzz spec: {missing}; add them to SPECS in {__file__}"
    assert not set(specs(state)) - set(ROUTES), "SPECS names a route the app no longer has"
    assert len(ROUTES) == 24


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_random_bodies_get_only_documented_codes(fuzzed, path):
    http, state = fuzzed
    spec = specs(state).get(path)
    assert spec is not None, f"route {path} has no fuzz spec"
    seen: dict[tuple[str, int], int] = {}

    @FUZZ
    @given(request=requests_for(spec, ROUTES[path]))
    def fuzz(request):
        kind, method, body, chunked = request
        answer = send(http, method, path, body, chunked)
        check(answer, kind, path, spec, chunked)
        if path == "/release_memory_occupation" and answer.status_code == 200:
            rewrite_if_dropped(http, state, answer)
        seen[kind, answer.status_code] = seen.get((kind, answer.status_code), 0) + 1

    fuzz()
    assert http.get("/health").status_code == 200
    assert any(kind == "valid" for kind, _ in seen), seen
    print(f"\n{path}: {sorted(seen.items())}")


@FUZZ
@given(path=st.text(alphabet="abcxyz/_-.%", min_size=1, max_size=20), method=st.sampled_from(METHODS))
def test_unknown_paths_get_404_json(fuzzed, path, method):
    http, _ = fuzzed
    path = "/" + path.lstrip("/")
    if path in ROUTES or path.rstrip("/") in ROUTES:
        return
    answer = http.request(method, path)
    assert answer.status_code in (404, 307), (path, answer.text)
    if answer.status_code == 404:
        assert answer.json()["error"]["code"] == 404


# Bodies that answered 500 (and closed the connection) before this change, found while writing the fuzz.
FOUND = [
    ("/generate", b'{"text": "\\ud800", "sampling_params": {"max_new_tokens": 1}}', 400, "lone UTF-16 surrogate"),
    ("/generate", b'{"text": "hi", "stream": true, "sampling_params": {"stop": "\\udfff"}}', 400, "surrogate"),
    ("/update_weights_from_disk", b'{"model_path": "a\\u0000b"}', 400, "NUL byte"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', 400,
     "messages.0.content: a text part's 'text' must be a string"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"tokenize": false}}',
     400, "chat_template_kwargs may not set 'tokenize'"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": 1}}',
     400, "chat_template_kwargs may not set 'messages'"),
    ("/update_weights_from_tensor", b'{"serialized_named_tensors": ["AAAA"]}', 400, "is not base64 safetensors"),
]


@pytest.mark.parametrize("body", [b'{"text": "\\uD800"}', '{"text": "\\udfff"}'.encode("utf-16"),
                                  '{"text": "\\ud800"}'.encode("utf-32-le")], ids=["upper", "utf-16", "utf-32"])
def test_lone_surrogates_are_refused_in_every_spelling_and_encoding(body):
    """The closer look (encoding the parsed body again) is skipped only for UTF-8 bodies without a
    surrogate escape; every other body still gets it."""
    from miles_core.serve.bodies import parse_bytes

    with pytest.raises(RequestError, match="lone UTF-16 surrogate"):
        parse_bytes(body, GenerateBody, 1 << 20)
    pair = parse_bytes(b'{"text": "\\ud83d\\ude00"}', GenerateBody, 1 << 20)  # a pair is one character
    assert pair.text == "\U0001F600"


@pytest.mark.parametrize("path, body, status, message", FOUND, ids=[f"{p} {m[:20]}" for p, _, _, m in FOUND])
def test_bodies_the_fuzz_found_are_documented_errors(fuzzed, path, body, status, message):
    http, _ = fuzzed
    answer = http.post(path, content=body, headers={"content-type": "application/json"})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]["message"]
    assert http.get("/health").status_code == 200
