"""`miles serve`'s SGLang-native routes: shapes checked against SGLang's own schema, samples equal
to the in-process engine's, stop handling, streaming, abort, pause and weight updates."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
import torch
from safetensors.torch import save as save_safetensors

from miles_core.checkpoint.hf import iter_state_dict, save_hf_checkpoint
from miles_core.config import SamplingConfig
from miles_core.engine.protocol import GenerateRequest
from tests.serve.conftest import with_options
from tests.serve.sglang_schema import load_api_types


def test_generate_requests_and_answers_follow_sglang_schema(client):
    api = load_api_types()
    single = {"text": "1 + 2 =", "sampling_params": {"max_new_tokens": 4, "sampling_seed": 1}, "return_logprob": True}
    batch = {"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {"max_new_tokens": 3, "n": 2, "sampling_seed": 2},
             "rid": ["a", "b"], "return_logprob": True, "return_text_in_logprobs": True}
    for body in (single, batch):
        api.GenerateRequest.from_json_value(body)
    one = client.post("/generate", json=single).json()
    api.GenerateResponse.from_json_value(one)
    assert one["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert [entry[1] for entry in one["meta_info"]["output_token_logprobs"]] == one["output_ids"]
    assert all(entry[2] is None and entry[0] <= 0 for entry in one["meta_info"]["output_token_logprobs"])
    many = client.post("/generate", json=batch).json()
    assert len(many) == 4  # prompt-major: prompt i, sample j at 2 * i + j
    for answer in many:
        api.GenerateResponse.from_json_value(answer)
        assert all(isinstance(entry[2], str) for entry in answer["meta_info"]["output_token_logprobs"])
    assert [a["meta_info"]["id"] for a in many] == ["a", "a", "b", "b"]
    assert [a["meta_info"]["prompt_tokens"] for a in many] == [3, 3, 2, 2]


def test_samples_equal_the_in_process_engine_with_the_same_seed(served, client):
    _, state = served
    sampling = SamplingConfig(max_new_tokens=5, n_samples_per_prompt=3, temperature=1.0)
    local = state.engine.generate([GenerateRequest(input_ids=[7, 8, 9], sampling=sampling, seed=11)])[0]
    body = {"input_ids": [7, 8, 9], "sampling_params": {"max_new_tokens": 5, "n": 3, "sampling_seed": 11},
            "return_logprob": True}
    remote = client.post("/generate", json=body).json()
    assert [a["output_ids"] for a in remote] == [g.output_ids for g in local]
    assert [[e[0] for e in a["meta_info"]["output_token_logprobs"]] for a in remote] == [g.output_logprobs for g in local]
    assert len({tuple(g.output_ids) for g in local}) > 1  # n samples differ


def test_stop_token_ids_stop_and_no_stop_trim_keeps_the_stop(client):
    base = {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 6, "sampling_seed": 3}}
    free = client.post("/generate", json=base).json()
    stop_id = free["output_ids"][2]
    params = {**base["sampling_params"], "stop_token_ids": [stop_id], "skip_special_tokens": False}
    stopped = client.post("/generate", json={**base, "sampling_params": params}).json()
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert stopped["output_ids"] == free["output_ids"][: free["output_ids"].index(stop_id) + 1]
    kept = client.post("/generate", json={**base, "sampling_params": {**params, "no_stop_trim": True}}).json()
    assert kept["text"].startswith(stopped["text"]) and len(kept["text"]) >= len(stopped["text"])


def test_stream_sends_server_sent_events_ending_in_done(client):
    body = {"input_ids": [[1, 2], [3, 4]], "sampling_params": {"max_new_tokens": 3, "sampling_seed": 0}, "stream": True}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    answers = [json.loads(e) for e in events[:-1]]  # partial answers (finish_reason null), then the final
    finals = [a for a in answers if a["meta_info"]["finish_reason"] is not None]
    assert sorted(a["index"] for a in finals) == [0, 1]
    assert all(a["meta_info"]["finish_reason"]["type"] == "length" for a in finals)


def test_info_routes_follow_sglang_schema(client):
    api = load_api_types()
    assert client.get("/health").status_code == 200
    assert client.get("/health_generate").status_code == 200
    info = client.get("/get_model_info").json()
    api.GetModelInfoResponse.from_json_value(info)
    assert info["weight_version"] == "0" and info["is_generation"] is True
    server = client.get("/get_server_info").json()
    api.GetServerInfoResponse.from_json_value(server)
    assert server["max_context_length"] > 0 and server["miles"]["per_sample_seeds"] is True
    assert client.post("/flush_cache").status_code == 200


def test_abort_answers_a_waiting_request_with_an_abort_finish_reason(client):
    client.post("/pause_generation", json={"mode": "in_place"})
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(client.post("/generate", json={
        "input_ids": [1, 2], "rid": "slow-1", "sampling_params": {"max_new_tokens": 2}}).json()))
    waiting.start()
    time.sleep(0.5)
    assert client.post("/abort_request", json={"rid": "slow-1"}).status_code == 200
    waiting.join(timeout=30)
    client.post("/continue_generation", json={})
    assert answers[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert client.post("/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}).status_code == 200


def test_update_weights_from_disk_checks_the_root_and_sets_the_version(served, client, tmp_path):
    _, state = served
    original = state.facts.model_path
    changed = [(n, t * 0.5) for n, t in iter_state_dict(original)]
    save_hf_checkpoint(tmp_path / "v7", changed, state.facts.hf_config, source_dir=original)
    refused = client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "v7")})
    assert refused.status_code == 403 and "allowed model roots" in refused.json()["error"]["message"]
    with_options(state, allowed_model_roots=(str(tmp_path),))
    try:
        body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 4, "sampling_seed": 0}, "return_logprob": True}
        before = client.post("/generate", json=body).json()
        ok = client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "v7"), "weight_version": "7"})
        assert ok.status_code == 200 and ok.json()["success"] is True and ok.json()["weight_version"] == "7"
        after = client.post("/generate", json=body).json()
        assert after["meta_info"]["weight_version"] == "7"
        assert after["meta_info"]["output_token_logprobs"] != before["meta_info"]["output_token_logprobs"]
        bad = client.post("/update_weights_from_disk", json={"model_path": str(tmp_path)})
        assert bad.status_code == 400 and bad.json()["success"] is False
    finally:
        restored = client.post("/update_weights_from_disk", json={"model_path": original, "weight_version": "0"})
        with_options(state, allowed_model_roots=())
    assert restored.json()["success"] is True
    assert client.post("/generate", json=body).json()["meta_info"]["output_token_logprobs"] == \
        before["meta_info"]["output_token_logprobs"]


def test_update_weights_from_tensor_takes_safetensors_and_refuses_other_bytes(served, client):
    _, state = served
    name, tensor = next(iter(iter_state_dict(state.facts.model_path)))
    blob = base64.b64encode(save_safetensors({name: tensor.clone()})).decode()
    ok = client.post("/update_weights_from_tensor", json={"serialized_named_tensors": [blob], "weight_version": "0"})
    assert ok.status_code == 200 and ok.json()["success"] is True and ok.json()["weight_version"] == "0"
    pickled = base64.b64encode(b"\x80\x04K\x01.").decode()
    bad = client.post("/update_weights_from_tensor", json={"serialized_named_tensors": [pickled]})
    assert bad.status_code == 400 and "not base64 safetensors" in bad.json()["message"]
    wrong = base64.b64encode(save_safetensors({name: torch.zeros(3)})).decode()
    refused = client.post("/update_weights_from_tensor", json={"serialized_named_tensors": [wrong]})
    assert refused.status_code == 400 and refused.json()["success"] is False


@pytest.mark.parametrize("body, status, words", [
    ({"input_ids": [1] * 5000}, 400, "context holds"),
    ({"input_ids": [10**9]}, 400, "outside the vocabulary"),
    ({"input_ids": []}, 400, "empty"),
    ({"text": "a", "input_ids": [1]}, 400, "exactly one"),
    ({"input_ids": [[1], [2]], "sampling_params": [{}]}, 400, "1 entries for 2 prompts"),
])
def test_bad_prompts_are_refused_with_a_message(client, body, status, words):
    answer = client.post("/generate", json=body)
    assert answer.status_code == status and words in answer.json()["error"]["message"]
