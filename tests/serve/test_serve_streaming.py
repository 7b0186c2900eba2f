"""Token streaming with the native engine: `/generate` and OpenAI chat send events as tokens are
sampled, the last one equal to the non-streamed answer, and a client that leaves aborts its
request in the engine (its KV blocks come back) while the server keeps serving."""

from __future__ import annotations

import json
import time

import httpx
import pytest


@pytest.fixture(autouse=True)
def paced_engine(served, monkeypatch):
    """Every engine step takes at least 12 ms, over twice the worker's 5 ms poll, so each token is
    seen by its own poll and how many events a stream has does not depend on the machine's speed."""
    engine = served[1].engine
    step = engine.step

    def paced() -> bool:
        time.sleep(0.012)
        return step()

    monkeypatch.setattr(engine, "step", paced)


def _events(response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_generate_stream_sends_growing_answers_ending_in_the_plain_one(served, client):
    assert served[1].worker.streaming
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 32, "sampling_seed": 21}}
    plain = client.post("/generate", json=body).json()
    with client.stream("POST", "/generate", json={**body, "stream": True}) as response:
        events = _events(response)
    assert events[-1] == "[DONE]"
    answers = [json.loads(e) for e in events[:-1]]
    assert len(answers) > 1
    lengths = [len(a["output_ids"]) for a in answers]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    for earlier, later in zip(answers, answers[1:]):
        assert later["output_ids"][: len(earlier["output_ids"])] == earlier["output_ids"]
    assert all(a["meta_info"]["finish_reason"] is None for a in answers[:-1])
    final = answers[-1]
    assert final["output_ids"] == plain["output_ids"] and final["text"] == plain["text"]
    assert final["meta_info"]["finish_reason"] == plain["meta_info"]["finish_reason"] == {"type": "length", "length": 32}


def test_generate_stream_of_a_batch_indexes_each_sample(client):
    body = {"input_ids": [[1, 2], [3, 4]], "sampling_params": {"max_new_tokens": 4, "n": 2, "sampling_seed": 0},
            "stream": True}
    plain = client.post("/generate", json={**body, "stream": False}).json()
    with client.stream("POST", "/generate", json=body) as response:
        answers = [json.loads(e) for e in _events(response)[:-1]]
    finals = {a["index"]: a for a in answers if a["meta_info"]["finish_reason"] is not None}
    assert sorted(finals) == [0, 1, 2, 3]
    assert [finals[k]["output_ids"] for k in range(4)] == [p["output_ids"] for p in plain]


def test_a_client_that_leaves_mid_stream_aborts_its_request(served, client, monkeypatch):
    _, state = served
    engine = state.engine
    aborted = []
    original = engine.abort
    monkeypatch.setattr(engine, "abort", lambda rid: (aborted.append(rid), original(rid)))
    body = {"input_ids": [9, 10, 11], "rid": "leaver", "stream": True,
            "sampling_params": {"max_new_tokens": 400, "sampling_seed": 5}}
    with httpx.Client(base_url=served[0], timeout=60) as other:
        with other.stream("POST", "/generate", json=body) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["meta_info"]["finish_reason"] is None
    # closing the connection mid-stream: the server notices and aborts
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (aborted and not engine._handles
                                               and engine.blocks.num_free == engine.blocks.num_blocks):
        time.sleep(0.05)
    assert aborted == ["leaver"]
    assert not engine._handles  # no request left in the engine
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every KV block back in the pool
    assert client.get("/health").status_code == 200
    assert client.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_chat_stream_sends_deltas_that_add_up_to_the_plain_answer(client):
    body = {"model": "m", "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 48, "seed": 3}
    plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=stream) as response:
        chunks = [json.loads(e) for e in _events(response)[:-1]]
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert sum(1 for d in deltas if d) > 1
    assert "".join(deltas) == plain
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 48


@pytest.mark.parametrize("stop", [None, " the"])
def test_completion_stream_deltas_add_up_to_the_plain_text(client, stop):
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 10, "seed": 8, "stop": stop}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(e) for e in _events(response)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]
