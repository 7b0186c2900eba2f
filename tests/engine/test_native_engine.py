"""The native engine on the built-in tiny-qwen3 model: request/response shape and order,
logprobs against a teacher-forced forward, reproducibility and batch independence, greedy
decoding, every finish reason (length, stop token, eos, stop string, context cap), batching
limits, context errors, weight updates and pause/resume. One GPU test repeats the logprob
check on CUDA."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miles_core.config import EngineConfig, ModelConfig, SamplingConfig
from miles_core.engine import build_engine
from miles_core.engine.native import NativeEngine
from miles_core.engine.protocol import GenerateRequest
from miles_core.errors import MilesError
from miles_core.checkpoint.loading import LoadedModel, load_model

PROMPTS = ["2+3=", "The quick brown fox", "hello there, what is 12*7?", "abc"]


def load_tiny(cache_root, device: str) -> LoadedModel:
    """tiny-qwen3 generated into a private cache, so tests never touch the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MILES_CACHE", str(cache_root))
        return load_model(ModelConfig(source="tiny-qwen3", device=device))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> LoadedModel:
    return load_tiny(tmp_path_factory.mktemp("cache"), "cpu")


def engine_for(loaded: LoadedModel, **cfg) -> NativeEngine:
    return build_engine(EngineConfig(**cfg), loaded)


def request(loaded: LoadedModel, prompt: str, seed: int = 0, rid: str = "", **sampling) -> GenerateRequest:
    return GenerateRequest(input_ids=loaded.tokenizer.encode(prompt), sampling=SamplingConfig(**sampling),
                           seed=seed, rid=rid)


def teacher_forced_logprobs(model, prompt_ids: list[int], output_ids: list[int], temperature: float) -> list[float]:
    """log_softmax(logits / T) of each output token, from one forward over prompt + output."""
    ids = torch.tensor([prompt_ids + output_ids], device=model.lm_head.weight.device)
    with torch.no_grad():
        logits = model.lm_head(model(ids, torch.arange(ids.shape[1], device=ids.device)[None]))[0]
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    # The token at position p is predicted by the logits at position p - 1.
    steps = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1, device=ids.device)
    return logprobs[steps, torch.tensor(output_ids, device=ids.device)].tolist()


def greedy_chain(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(num_tokens):
            hidden = model(torch.tensor([ids]), torch.arange(len(ids))[None])
            ids.append(int(model.lm_head(hidden[0, -1]).argmax()))
    return ids[len(prompt_ids):]


def test_returns_n_generations_per_request_in_order(loaded):
    engine = engine_for(loaded)
    # Request i asks for 3 + i tokens, so the lengths show the order.
    requests = [request(loaded, p, seed=i, rid=f"r{i}", max_new_tokens=3 + i, n_samples_per_prompt=2)
                for i, p in enumerate(PROMPTS[:3])]
    progress: list[int] = []
    outputs = engine.generate(requests, on_progress=progress.append)
    assert [len(group) for group in outputs] == [2, 2, 2]
    for i, (req, group) in enumerate(zip(requests, outputs)):
        for gen in group:
            assert len(gen.output_ids) == len(gen.output_logprobs) == 3 + i
            assert gen.finish_reason == {"type": "length", "length": 3 + i}
            assert gen.prompt_tokens == len(req.input_ids)
            assert gen.weight_version == "0"
            assert gen.text == loaded.tokenizer.decode(gen.output_ids, skip_special_tokens=True)
        assert group[0].output_ids != group[1].output_ids  # the n samples use distinct streams
    assert sum(progress) == 6


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_teacher_forcing(loaded, temperature):
    engine = engine_for(loaded)
    requests = [request(loaded, p, seed=3, temperature=temperature, max_new_tokens=10, n_samples_per_prompt=2)
                for p in PROMPTS[:2]]
    for req, group in zip(requests, engine.generate(requests)):
        for gen in group:
            expected = teacher_forced_logprobs(loaded.model, req.input_ids, gen.output_ids, temperature)
            torch.testing.assert_close(torch.tensor(gen.output_logprobs), torch.tensor(expected),
                                       atol=1e-5, rtol=0)


def test_same_seeds_repeat_and_other_requests_do_not_change_outputs(loaded):
    engine = engine_for(loaded)
    a = request(loaded, PROMPTS[0], seed=5, max_new_tokens=12, n_samples_per_prompt=2)
    # Longer prompts (more padding, longer caches), other sampling settings, earlier finishes.
    b = request(loaded, PROMPTS[1], seed=6, temperature=0.7, max_new_tokens=3, n_samples_per_prompt=3)
    c = request(loaded, PROMPTS[2], seed=7, top_k=20, max_new_tokens=20)
    alone = engine.generate([a])[0]
    assert engine.generate([a])[0] == alone  # run to run: bitwise equal
    shared = engine.generate([b, a, c])[1]
    assert [g.output_ids for g in shared] == [g.output_ids for g in alone]
    assert [g.finish_reason for g in shared] == [g.finish_reason for g in alone]
    # Logprobs agree to fp32 rounding, not bitwise: CPU GEMM kernels sum in a different order
    # for a different number of rows (measured up to 4.8e-7 here).
    for x, y in zip(shared, alone):
        torch.testing.assert_close(torch.tensor(x.output_logprobs), torch.tensor(y.output_logprobs),
                                   atol=2e-6, rtol=0)


def test_different_seeds_give_different_outputs(loaded):
    engine = engine_for(loaded)
    first, second = engine.generate([request(loaded, PROMPTS[0], seed=s, max_new_tokens=8) for s in (0, 1)])
    assert first[0].output_ids != second[0].output_ids


def test_greedy_is_the_argmax_chain(loaded):
    engine = engine_for(loaded)
    req = request(loaded, PROMPTS[1], temperature=0.0, max_new_tokens=10, n_samples_per_prompt=2)
    group = engine.generate([req])[0]
    expected = greedy_chain(loaded.model, req.input_ids, 10)
    assert [g.output_ids for g in group] == [expected, expected]
    # Greedy rows report logprobs of the unscaled distribution (temperature 1).
    unscaled = teacher_forced_logprobs(loaded.model, req.input_ids, expected, 1.0)
    torch.testing.assert_close(torch.tensor(group[0].output_logprobs), torch.tensor(unscaled), atol=1e-5, rtol=0)


def test_stop_token_ids_stop_and_keep_the_token(loaded):
    req = request(loaded, PROMPTS[0], seed=11, max_new_tokens=12)
    free = engine_for(loaded).generate([req])[0][0].output_ids
    stop_token = free[4]
    cut = free.index(stop_token) + 1  # the stream is unchanged up to the first occurrence
    assert cut < len(free)

    stopped = engine_for(loaded).generate([request(loaded, PROMPTS[0], seed=11, max_new_tokens=12,
                                                   stop_token_ids=(stop_token,))])[0][0]
    assert stopped.output_ids == free[:cut]
    assert stopped.finish_reason == {"type": "stop", "matched": stop_token}
    assert len(stopped.output_logprobs) == cut


class ScriptedModel(nn.Module):
    """Stand-in model whose greedy output is a fixed script: the hidden state is the one-hot
    position and `lm_head` maps position p to a large logit on `script[p]`."""

    def __init__(self, script: list[int], vocab: int = 320, max_len: int = 64) -> None:
        super().__init__()
        self.max_len = max_len
        self.args = SimpleNamespace(num_hidden_layers=1)
        self.lm_head = nn.Linear(max_len, vocab, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for position, token in enumerate(script):
                self.lm_head.weight[token, position] = 50.0

    def forward(self, input_ids_BT, position_ids_BT, kv_cache=None, routing=None):
        return F.one_hot(position_ids_BT, self.max_len).float()

    def kv_cache_dims(self) -> tuple[int, int, int]:
        return 1, 1, 1  # one layer (`args`) of one head of size 1: the engine's pool is tiny


def scripted_engine(loaded: LoadedModel, prompt_ids: list[int], output_ids: list[int]) -> NativeEngine:
    """Greedy requests for `prompt_ids` get `output_ids` (the prompt's last position predicts
    the first output token)."""
    model = ScriptedModel([0] * (len(prompt_ids) - 1) + output_ids)
    return NativeEngine(model, loaded.tokenizer, EngineConfig(), eos_token_ids=loaded.eos_token_ids,
                        max_position_embeddings=model.max_len)


def generate_scripted(loaded: LoadedModel, text: str, stop: tuple[str, ...] = ()):
    prompt, script = [81, 58], loaded.tokenizer.encode(text)  # "Q:" -> text
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=len(script), stop=stop)
    return script, scripted_engine(loaded, prompt, script).generate([GenerateRequest(prompt, sampling)])[0][0]


def test_checkpoint_eos_stops_and_is_left_out_of_the_text(loaded):
    eos = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert loaded.eos_token_ids == frozenset({eos}) == frozenset({258})  # from config + tokenizer
    script, gen = generate_scripted(loaded, "ok<|im_end|>xy")
    assert script == [111, 107, eos, 120, 121]
    assert gen.output_ids == [111, 107, eos]
    assert gen.finish_reason == {"type": "stop", "matched": eos}
    assert gen.text == "ok"


def test_stop_string_stops_and_cuts_the_text(loaded):
    engine = engine_for(loaded)
    greedy = dict(temperature=0.0, max_new_tokens=30)
    free = engine.generate([request(loaded, PROMPTS[0], **greedy)])[0][0]
    ids, decode = free.output_ids, loaded.tokenizer.decode
    # A stop string the model emits: the first two consecutive printable ASCII bytes.
    start = next(i for i in range(1, len(ids) - 2) if all(33 <= t <= 126 for t in ids[i : i + 2]))
    stop = decode(ids[start : start + 2])
    assert len(stop) == 2 and stop not in decode(ids[: start + 1])

    out = engine.generate([request(loaded, PROMPTS[0], stop=("never-emitted", stop), **greedy)])[0][0]
    assert out.finish_reason == {"type": "stop", "matched": stop}
    assert out.output_ids == ids[: start + 2]
    assert out.text == free.text[: free.text.index(stop)]
    assert stop not in out.text


def test_stop_string_of_one_multibyte_character(loaded):
    script, gen = generate_scripted(loaded, "ab世界cd", stop=("界",))
    assert len(script) == 10  # 世 and 界 are three byte tokens each
    assert gen.finish_reason == {"type": "stop", "matched": "界"}
    assert gen.output_ids == script[:8]
    assert gen.text == "ab世"


def test_multibyte_stop_string_is_found(loaded):
    script, gen = generate_scripted(loaded, "ab世界cd", stop=("世界",))
    assert gen.finish_reason == {"type": "stop", "matched": "世界"}  # fails: length 10
    assert gen.output_ids == script[:8]
    assert gen.text == "ab"


def test_small_max_batch_size_gives_the_same_results(loaded):
    requests = [request(loaded, p, seed=20 + i, max_new_tokens=6, n_samples_per_prompt=2)
                for i, p in enumerate(PROMPTS)]
    big = engine_for(loaded, max_batch_size=64).generate(requests)
    small = engine_for(loaded, max_batch_size=3).generate(requests)  # 8 sequences in 3 batches
    assert [[g.output_ids for g in group] for group in small] == [[g.output_ids for g in group] for group in big]
    for small_group, big_group in zip(small, big):
        for x, y in zip(small_group, big_group):
            torch.testing.assert_close(torch.tensor(x.output_logprobs), torch.tensor(y.output_logprobs),
                                       atol=2e-6, rtol=0)


def test_prompt_must_be_non_empty_and_leave_room_in_the_context(loaded):
    engine = engine_for(loaded, max_context_len=16)
    assert engine_for(loaded).max_context_len == 1024  # the model's max_position_embeddings
    for length in (20, 16):
        req = GenerateRequest(input_ids=list(range(65, 65 + length)), sampling=SamplingConfig(), rid="long")
        with pytest.raises(MilesError) as err:
            engine.generate([req])
        assert str(err.value) == (f"prompt of request 'long' has {length} tokens; the context holds 16 "
                                  "(engine.max_context_len or the model's limit)")
    empty = GenerateRequest(input_ids=[], sampling=SamplingConfig(), rid="e")
    with pytest.raises(MilesError, match="^request 'e' has an empty prompt$"):
        engine.generate([empty])


def test_generation_is_capped_by_the_context(loaded):
    engine = engine_for(loaded, max_context_len=16)
    req = GenerateRequest(input_ids=list(range(65, 75)), sampling=SamplingConfig(max_new_tokens=64))
    gen = engine.generate([req])[0][0]
    assert len(gen.output_ids) == 6  # 16 - 10 prompt tokens
    assert gen.finish_reason == {"type": "length", "length": 6}


def test_update_weights_changes_outputs_and_stamps_the_version(loaded):
    model = copy.deepcopy(loaded.model)
    engine = NativeEngine(model, loaded.tokenizer, EngineConfig(), eos_token_ids=loaded.eos_token_ids,
                          max_position_embeddings=1024)
    req = request(loaded, PROMPTS[0], temperature=0.0, max_new_tokens=8)
    before = engine.generate([req])[0][0]
    new_head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    engine.update_weights([("lm_head.weight", new_head)], version="7")
    after = engine.generate([req])[0][0]
    assert engine.weight_version == after.weight_version == "7"
    assert before.weight_version == "0"
    assert after.output_ids != before.output_ids
    assert torch.equal(model.lm_head.weight, new_head)
    assert after.output_ids == greedy_chain(model, req.input_ids, 8)


def test_update_weights_rejects_unknown_names_and_wrong_shapes(loaded):
    engine = NativeEngine(copy.deepcopy(loaded.model), loaded.tokenizer, EngineConfig(),
                          eos_token_ids=loaded.eos_token_ids, max_position_embeddings=1024)
    with pytest.raises(MilesError, match=r"^update_weights: unknown parameter 'lm_head\.bias'$"):
        engine.update_weights([("lm_head.bias", torch.zeros(320))], version="1")
    with pytest.raises(MilesError) as err:
        engine.update_weights([("model.norm.weight", torch.ones(32))], version="1")
    assert str(err.value) == "update_weights: 'model.norm.weight' has shape (32,), expected (64,)"
    assert engine.weight_version == "0"


def test_rejected_update_leaves_the_weights_unchanged(loaded):
    model = copy.deepcopy(loaded.model)
    engine = NativeEngine(model, loaded.tokenizer, EngineConfig(), eos_token_ids=loaded.eos_token_ids,
                          max_position_embeddings=1024)
    head = model.lm_head.weight.clone()
    with pytest.raises(MilesError, match="unknown parameter"):
        engine.update_weights([("lm_head.weight", torch.zeros_like(head)), ("nope", torch.zeros(1))], version="1")
    assert engine.weight_version == "0"
    assert torch.equal(model.lm_head.weight, head)  # fails: lm_head is now all zeros


def test_pause_blocks_generate_until_resume(loaded):
    engine = engine_for(loaded)
    req = request(loaded, PROMPTS[3], max_new_tokens=2)
    engine.pause()
    assert engine.health() is False
    with pytest.raises(MilesError, match=r"^the engine is paused; call resume\(\) before generate\(\)$"):
        engine.generate([req])
    engine.resume()
    assert engine.health() is True
    assert len(engine.generate([req])[0][0].output_ids) == 2


@pytest.mark.gpu
def test_cuda_generation_logprobs_match_teacher_forcing(tmp_path):
    loaded = load_tiny(tmp_path / "cache", "cuda")
    engine = engine_for(loaded)
    assert engine.device.type == "cuda"
    requests = [request(loaded, p, seed=1, temperature=0.7, max_new_tokens=8, n_samples_per_prompt=2)
                for p in PROMPTS[:2]]
    for req, group in zip(requests, engine.generate(requests)):
        for gen in group:
            assert len(gen.output_ids) == 8
            expected = teacher_forced_logprobs(loaded.model, req.input_ids, gen.output_ids, 0.7)
            torch.testing.assert_close(torch.tensor(gen.output_logprobs), torch.tensor(expected),
                                       atol=1e-4, rtol=0)
