"""`RolloutManager.generate`: requests built from prompts (seeds, ids, sampling), and every
`Sample` field filled from the engine's generations (tokens, lengths, masks, logprobs,
status, numbering, weight versions, label and metadata). A recording engine gives exact
control; one run on the tiny-qwen3 native engine checks the logprobs against the tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from miles_core.config import DataConfig, EngineConfig, ModelConfig, RewardConfig, SamplingConfig
from miles_core.engine import build_engine
from miles_core.engine.protocol import GenerateRequest, Generation
from miles_core.checkpoint.loading import load_model
from miles_core.rl.manager import RolloutManager
from miles_core.sample import Sample, Status

FINISH = [
    {"type": "stop", "matched": 7},
    {"type": "length", "length": 3},
    {"type": "stop", "matched": "</s>"},
    {"type": "abort", "message": "client went away"},
]


class RecordingEngine:
    """Answers request i, sample j with output ids [100 * i + 10 * j + k for k < j + 1 + i] and
    finish reason FINISH[(2 * i + j) % 4]; records the requests and the progress callback."""

    weight_version = "v3"

    def __init__(self) -> None:
        self.requests: list[GenerateRequest] = []
        self.on_progress = None

    def generate(self, requests, on_progress=None) -> list[list[Generation]]:
        self.requests, self.on_progress = list(requests), on_progress
        return [[self._generation(i, j) for j in range(r.sampling.n_samples_per_prompt)]
                for i, r in enumerate(requests)]

    def _generation(self, i: int, j: int) -> Generation:
        ids = [100 * i + 10 * j + k for k in range(j + 1 + i)]
        experts = np.full((4, 1, 2), i * 10 + j, dtype=np.int32)
        return Generation(output_ids=ids, output_logprobs=[-0.5 * (k + 1) for k in range(len(ids))],
                          finish_reason=FINISH[(2 * i + j) % 4], text=f"text-{i}-{j}",
                          prompt_tokens=0, weight_version=self.weight_version, routed_experts=experts)


def generate_group_samples(engine, samples, ids, sampling, *, first_seed, on_progress=None):
    manager = RolloutManager(engine, None, data=DataConfig(), sampling=sampling, reward=RewardConfig())
    return manager.generate(samples, ids, first_seed=first_seed, on_progress=on_progress)


def prompts() -> tuple[list[Sample], list[list[int]]]:
    samples = [Sample(index=10, prompt="What is 2+3?", label="5", metadata={"source": "arith"}),
               Sample(index=11, prompt=[{"role": "user", "content": "hi"}], label={"answer": 1})]
    return samples, [[1, 2, 3], [4, 5]]


def test_requests_carry_ids_sampling_and_seeds():
    engine = RecordingEngine()
    samples, ids = prompts()
    sampling = SamplingConfig(temperature=0.7, n_samples_per_prompt=2)
    progress = []
    generate_group_samples(engine, samples, ids, sampling, first_seed=100, on_progress=progress.append)
    assert [(r.input_ids, r.seed, r.rid) for r in engine.requests] == [
        ([1, 2, 3], 100, "prompt-10"), ([4, 5], 101, "prompt-11")]
    assert all(r.sampling is sampling for r in engine.requests)
    assert engine.on_progress == progress.append


def test_samples_fill_every_field():
    engine = RecordingEngine()
    samples, ids = prompts()
    groups = generate_group_samples(engine, samples, ids, SamplingConfig(n_samples_per_prompt=2), first_seed=0)
    assert [len(g) for g in groups] == [2, 2]
    flat = [s for g in groups for s in g]
    assert [(s.index, s.group_index) for s in flat] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    # request i, sample j: output ids 100i + 10j + k for k < j + 1 + i
    outputs = [[0], [10, 11], [100, 101], [110, 111, 112]]
    prompt_ids = [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
    for sample, out, prompt in zip(flat, outputs, prompt_ids):
        assert sample.tokens == prompt + out
        assert (sample.response_length, sample.prompt_length, sample.response_tokens) == (len(out), len(prompt), out)
        assert sample.loss_mask == [1] * len(out)
        assert sample.rollout_log_probs == [-0.5 * (k + 1) for k in range(len(out))]
        assert sample.weight_versions == ["v3"] * len(out)  # one per response token
        assert sample.reward is None
    assert [s.response for s in flat] == ["text-0-0", "text-0-1", "text-1-0", "text-1-1"]
    # FINISH[(2i + j) % 4]: stop, length, stop (string), abort
    assert [s.status for s in flat] == [Status.COMPLETED, Status.TRUNCATED, Status.COMPLETED, Status.ABORTED]
    assert [s.metadata for s in flat[:2]] == [{"source": "arith", "finish_reason": FINISH[0]},
                                              {"source": "arith", "finish_reason": FINISH[1]}]
    assert [s.metadata for s in flat[2:]] == [{"finish_reason": FINISH[2]}, {"finish_reason": FINISH[3]}]
    assert samples[0].metadata == {"source": "arith"}  # the prompt record is not changed
    assert [s.label for s in flat] == ["5", "5", {"answer": 1}, {"answer": 1}]
    assert [s.prompt for s in flat[1:3]] == ["What is 2+3?", [{"role": "user", "content": "hi"}]]
    assert [int(s.rollout_routed_experts[0, 0, 0]) for s in flat] == [0, 1, 10, 11]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MILES_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_model(ModelConfig(source="tiny-qwen3", device="cpu"))


def test_native_engine_samples_match_their_tokens(tiny):
    engine = build_engine(EngineConfig(), tiny)
    samples = [Sample(index=i, prompt=p) for i, p in enumerate(["2+3=", "The quick brown fox"])]
    ids = [tiny.tokenizer.encode(s.prompt) for s in samples]
    free = generate_group_samples(engine, samples, ids, SamplingConfig(max_new_tokens=6, n_samples_per_prompt=2),
                                  first_seed=4)
    stop_token = free[1][0].response_tokens[2]  # sample 0 of prompt 1 stops on its third token
    sampling = SamplingConfig(max_new_tokens=6, n_samples_per_prompt=2, stop_token_ids=(stop_token,))
    groups = generate_group_samples(engine, samples, ids, sampling, first_seed=4)
    prompt_of = [ids[0], ids[0], ids[1], ids[1]]
    for free_sample, sample, prompt in zip([s for g in free for s in g], [s for g in groups for s in g], prompt_of):
        assert sample.tokens[: sample.prompt_length] == prompt
        if stop_token in free_sample.response_tokens:  # same seeds: the same stream, cut at the stop
            cut = free_sample.response_tokens.index(stop_token) + 1
            finish, status = {"type": "stop", "matched": stop_token}, Status.COMPLETED
        else:
            cut, finish, status = 6, {"type": "length", "length": 6}, Status.TRUNCATED
        assert sample.response_tokens == free_sample.response_tokens[:cut]
        assert (sample.status, sample.response_length, sample.metadata) == (status, cut, {"finish_reason": finish})
        assert sample.weight_versions == ["0"] * sample.response_length
        shown = sample.response_tokens[:-1] if status == Status.COMPLETED else sample.response_tokens
        assert sample.response == tiny.tokenizer.decode(shown, skip_special_tokens=True)  # stop token trimmed
        # What the trainer recomputes from `tokens`: the logprob of each response token.
        tokens = torch.tensor([sample.tokens])
        with torch.no_grad():
            logits = tiny.model.lm_head(tiny.model(tokens, torch.arange(tokens.shape[1])[None]))[0]
        logprobs = torch.log_softmax(logits, -1)[sample.prompt_length - 1 : -1]
        recomputed = logprobs.gather(-1, torch.tensor(sample.response_tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(sample.rollout_log_probs), recomputed, atol=1e-5, rtol=0)
    assert groups[1][0].response_length == 3  # the stop token is its third
