"""`miles serve` memory routes (engine.colocate) and `/get_weights_by_name`: release frees the
KV pool and answers its bytes, generation is refused with 409 while released, resume restores
the same weights and the same tokens (or, dropped at release, none until a sync wrote them);
partial tags are refused; weights read back exactly."""

from __future__ import annotations

from pathlib import Path

import torch

from miles_core.config import EngineConfig
from miles_core.engine.http import SGLangHttpEngine
from miles_core.models.base import named_weights
from tests.serve.conftest import with_options

BODY = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 3},
        "return_logprob": True}


def test_release_refuses_generation_and_resume_gives_the_same_tokens(served, client):
    _, state = served
    before = client.post("/generate", json=BODY).json()
    pool_bytes = state.engine.pool.num_bytes
    released = client.post("/release_memory_occupation", json={})
    assert released.status_code == 200, released.text
    assert released.json()["success"] is True
    assert released.json()["miles"]["kv_cache_bytes"] == pool_bytes > 0
    assert state.engine.pool.num_bytes == 0
    refused = client.post("/generate", json=BODY)
    assert refused.status_code == 409 and "memory is released" in refused.json()["error"]["message"]
    assert client.get("/health").status_code == 200  # alive, only released
    assert client.post("/resume_memory_occupation", json={"tags": ["weights", "kv_cache", "cuda_graph"]}).status_code == 200
    after = client.post("/generate", json=BODY).json()
    assert after["output_ids"] == before["output_ids"]
    assert after["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]


def test_partial_tags_are_refused(client):
    answer = client.post("/release_memory_occupation", json={"tags": ["kv_cache"]})
    assert answer.status_code == 400
    assert "releases and resumes cuda_graph, kv_cache, weights together" in answer.json()["error"]["message"]


def test_get_weights_by_name_gives_the_exact_values(served, client):
    _, state = served
    held = dict(named_weights(state.engine.model))["model.layers.0.self_attn.q_proj.weight"]
    answer = client.post("/get_weights_by_name", json={"name": "model.layers.0.self_attn.q_proj.weight",
                                                        "truncate_size": 10**9})
    assert torch.equal(torch.tensor(answer.json(), dtype=torch.float64).to(held.dtype), held.detach())
    first = client.post("/get_weights_by_name", json={"name": "model.layers.0.self_attn.q_proj.weight"}).json()
    assert len(first) == min(100, held.shape[0])  # SGLang's default truncate_size: the first 100 rows
    missing = client.post("/get_weights_by_name", json={"name": "nope"})
    assert missing.status_code == 404 and "unknown parameter 'nope'" in missing.json()["error"]["message"]


def test_a_release_that_drops_the_weights_refuses_generation_until_a_sync_wrote_them(served, client):
    """The run's client asks `miles serve` to drop the weights (the sync after the resume rewrites
    them); an SGLang server is sent SGLang's body alone."""
    url, state = served
    engine = SGLangHttpEngine(EngineConfig(backend="sglang", urls=(url,)), urls=(url,))
    assert engine.servers[0].miles
    before = client.post("/generate", json=BODY).json()
    freed = engine.release_memory(keep_weights=False)
    assert freed["weights_dropped_bytes"] > freed["weights_bytes"] > 0  # only the RoPE frequencies were copied
    engine.resume_memory()
    refused = client.post("/generate", json=BODY)
    assert refused.status_code == 409
    assert "weights were dropped at release_memory and no update has written them" in refused.json()["error"]["message"]
    with_options(state, allowed_model_roots=(str(Path(state.facts.model_path).parent),))
    try:
        engine.update_weights_from_disk(state.facts.model_path, version=engine.weight_version)
    finally:
        with_options(state, allowed_model_roots=())
    after = client.post("/generate", json=BODY).json()
    assert after["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]
    engine.servers[0].miles = False  # as if SGLang: no `keep_weights` in the body, so this server keeps them
    assert engine.release_memory(keep_weights=False)["weights_dropped_bytes"] == 0
    engine.resume_memory()
    assert client.post("/generate", json=BODY).json()["output_ids"] == before["output_ids"]
