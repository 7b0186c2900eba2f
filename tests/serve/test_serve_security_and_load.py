"""`miles serve` under bad input and load: api keys, weight routes refused without one, body
limits, fuzzed bodies all 4xx (never a 500, never a crash), and 64 concurrent clients."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from tests.serve.conftest import start


@pytest.fixture(scope="module")
def keyed():
    state, thread = start(api_key="sekret", max_request_bytes=4096)
    with thread as url:
        yield url, state


def test_api_key_guards_every_route_but_health(keyed):
    url, _ = keyed
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        for path in ("/get_model_info", "/v1/models", "/health_generate"):
            answer = http.get(path)
            assert answer.status_code == 401 and "api key" in answer.json()["error"]["message"]
        assert http.get("/get_model_info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = {"Authorization": "Bearer sekret"}
        assert http.get("/get_model_info", headers=good).status_code == 200
        answer = http.post("/update_weights_from_disk", json={"model_path": "/etc"}, headers=good)
        assert answer.status_code == 403 and "allowed model roots" in answer.json()["error"]["message"]


def test_weight_routes_need_a_key_unless_allowed():
    state, thread = start()
    with thread as url, httpx.Client(base_url=url, timeout=30) as http:
        for path in ("/update_weights_from_disk", "/update_weights_from_tensor", "/release_memory_occupation"):
            answer = http.post(path, json={})
            assert answer.status_code == 403 and "--api-key" in answer.json()["error"]["message"]
        assert http.post("/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}).status_code == 200


def test_oversize_bodies_get_413(keyed):
    url, _ = keyed
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": "Bearer sekret"}) as http:
        answer = http.post("/generate", json={"input_ids": [1] * 5000})
        assert answer.status_code == 413 and "max-request-bytes" in answer.json()["error"]["message"]


def _fuzzed_bodies(rng: random.Random, count: int) -> list[bytes]:
    good = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1, "temperature": 1.0, "top_p": 0.9,
                                                         "top_k": 5, "n": 1, "stop": ["x"]}, "return_logprob": True}
    junk = [None, True, -1, 2**70, 1e308, float("nan"), "", "x" * 50, [], [None], {}, {"a": 1}, [[-5]], -0.5]
    bodies = [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"input_ids": [1,2', b"1" * 100, b'"text"']
    while len(bodies) < count:
        body = json.loads(json.dumps(good))
        target = body if rng.random() < 0.5 else body["sampling_params"]
        key = rng.choice(list(target) + ["unknown_field", "rid", "logprob_start_len", "stream"])
        target[key] = rng.choice(junk)
        bodies.append(json.dumps(body, allow_nan=True).encode())
    return bodies


def test_fuzzed_bodies_all_get_4xx_and_the_server_survives(served):
    url, _ = served
    rng = random.Random(0)
    statuses = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for body in _fuzzed_bodies(rng, 80):
            for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/abort_request"):
                answer = http.post(path, content=body, headers={"content-type": "application/json"})
                if answer.status_code != 200:
                    assert 400 <= answer.status_code < 500, (path, body, answer.text)
                    assert answer.json()["error"]["message"]
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
        assert http.get("/health").status_code == 200
    assert statuses.get(400, 0) > 150


def test_64_concurrent_clients_get_every_answer_once(served):
    url, state = served
    num_clients = 64
    state.worker.stats.max_concurrent = 0

    async def one(http: httpx.AsyncClient, k: int) -> dict:
        body = {"input_ids": [1 + k % 50, 2, 3], "rid": f"load-{k}",
                "sampling_params": {"max_new_tokens": 4, "sampling_seed": k}}
        answer = await http.post("/generate", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def run() -> list[dict]:
        limits = httpx.Limits(max_connections=num_clients)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            return await asyncio.gather(*(one(http, k) for k in range(num_clients)))

    start_time = time.perf_counter()
    answers = asyncio.run(run())
    seconds = time.perf_counter() - start_time
    rids = [a["meta_info"]["id"] for a in answers]
    assert sorted(rids) == sorted(f"load-{k}" for k in range(num_clients))  # none lost, none twice
    assert all(a["meta_info"]["completion_tokens"] == 4 for a in answers)
    assert seconds < 60
    concurrent = state.worker.stats.max_concurrent
    assert concurrent > 1  # concurrent requests ran in the engine's batch together
    print(f"\nload test: {num_clients} clients, {num_clients} requests, 0 errors, {seconds:.2f} s, "
          f"at most {concurrent} sequences in flight at once")
