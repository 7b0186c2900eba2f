"""Invariant mode: engine and trainer log-probs are bitwise equal (KL exactly 0) for tiny Llama
and Qwen3 models, across engine batch sizes 1..64, mixed prompt lengths, every trainer forward
path (padded, shared prompt, packed) and different micro-batch budgets; fast mode shows a small
non-zero mismatch. GPU tests repeat the check on CUDA (Triton kernels) and skip themselves
without CUDA."""

from __future__ import annotations

import copy
import functools
import shutil

import pytest
import torch
import transformers

from miles_core.config import EngineConfig, ModelConfig, SamplingConfig
from miles_core.engine.native import NativeEngine
from miles_core.engine.protocol import GenerateRequest
from miles_core.algo.mismatch import MismatchSums
from miles_core.checkpoint.loading import load_model
from miles_core.train.batch import micro_batches, response_log_probs, shared_prefix_log_probs
from miles_core.train.packing import packed_log_probs

BATCH_SIZES = (1, 3, 16, 64)
# Every trainer forward: padded rows, prompts run once, packed rows (plain and prompt-sharing).
TRAINER_FORWARDS = ((response_log_probs, 10_000), (shared_prefix_log_probs, 200), (packed_log_probs, 300),
                    (functools.partial(packed_log_probs, share_prompt_prefix=True), 300))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """tiny-qwen3 (built-in) and a tiny random Llama sharing its byte-level tokenizer."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MILES_CACHE", str(tmp_path_factory.mktemp("cache")))
    qwen = load_model(ModelConfig(source="tiny-qwen3", device="cpu")).path
    patch.undo()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True)
    llama = tmp_path_factory.mktemp("llama")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(llama)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (qwen / name).exists():
            shutil.copy(qwen / name, llama / name)
    return {"qwen3": str(qwen), "llama": str(llama)}


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (count,), generator=gen)
    return [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in lengths]


def _generate(loaded, prompts, batch_size: int, device: str):
    engine = NativeEngine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=batch_size),
                          eos_token_ids=(), max_position_embeddings=512)
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=10, n_samples_per_prompt=2)
    generations = engine.generate([GenerateRequest(input_ids=p, sampling=sampling, seed=i) for i, p in enumerate(prompts)])
    tokens, lengths, rollout = [], [], []
    for prompt, group in zip(prompts, generations):
        for gen in group:
            tokens.append(torch.tensor(prompt + gen.output_ids, device=device))
            lengths.append(len(gen.output_ids))
            rollout.append(torch.tensor(gen.output_logprobs))
    return tokens, lengths, rollout


def _mismatch(model, tokens, lengths, rollout, forward, budget: int) -> dict[str, float]:
    """Trainer log-probs in micro-batches of `budget` tokens, compared with the engine's. The
    forward runs with gradients on, as a training step's does: a kernel that dispatched otherwise
    under autograd would give the training loss other bits than a no-grad check sees."""
    sums = MismatchSums()
    for p in model.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        for group in micro_batches([len(t) for t in tokens], budget):
            logps, _ = forward(model, [tokens[i] for i in group], [lengths[i] for i in group],
                               temperature=0.8, chunk_size=64)
            for i, logp in zip(group, logps):
                assert logp.requires_grad  # the training path, not an inference shortcut
                sums.add(logp.detach().cpu(), rollout[i])
    return sums.metrics()


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_invariant_mode_gives_bitwise_equal_log_probs(model_dirs, family):
    loaded = load_model(ModelConfig(source=model_dirs[family], device="cpu"), alignment_mode="invariant")
    trainer_model = copy.deepcopy(loaded.model).train()
    prompts = _prompts(32)
    for batch_size in BATCH_SIZES:
        tokens, lengths, rollout = _generate(loaded, prompts, batch_size, "cpu")
        for forward, budget in TRAINER_FORWARDS:
            stats = _mismatch(trainer_model, tokens, lengths, rollout, forward, budget)
            assert stats["num_tokens"] == 640
            assert stats["kl_k1"] == 0.0 and stats["kl_k3"] == 0.0, (batch_size, forward)
            assert stats["bitwise_equal"] == 1.0 and stats["max_abs_diff"] == 0.0


def test_fast_mode_shows_a_small_nonzero_mismatch(model_dirs):
    loaded = load_model(ModelConfig(source=model_dirs["qwen3"], device="cpu"), alignment_mode="fast")
    tokens, lengths, rollout = _generate(loaded, _prompts(32), 64, "cpu")
    stats = _mismatch(copy.deepcopy(loaded.model), tokens, lengths, rollout, response_log_probs, 10_000)
    assert 0.0 < stats["max_abs_diff"] < 1e-4
    assert stats["bitwise_equal"] < 1.0
    assert stats["kl_k3"] < 1e-9


def test_engine_outputs_do_not_depend_on_batch_size_in_invariant_mode(model_dirs):
    loaded = load_model(ModelConfig(source=model_dirs["qwen3"], device="cpu"), alignment_mode="invariant")
    prompts = _prompts(16, seed=3)
    runs = [_generate(loaded, prompts, size, "cpu") for size in (1, 5, 64)]
    for tokens, _, rollout in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(tokens, runs[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(rollout, runs[0][2]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_invariant_mode_on_cuda(model_dirs, dtype):
    loaded = load_model(ModelConfig(source=model_dirs["qwen3"], device="cuda", dtype=dtype), alignment_mode="invariant")
    trainer_model = copy.deepcopy(loaded.model)
    prompts = _prompts(32)
    for batch_size in BATCH_SIZES:
        tokens, lengths, rollout = _generate(loaded, prompts, batch_size, "cuda")
        for forward, budget in TRAINER_FORWARDS:
            stats = _mismatch(trainer_model, tokens, lengths, rollout, forward, budget)
            assert stats["kl_k3"] == 0.0 and stats["bitwise_equal"] == 1.0, (dtype, batch_size, forward, stats)


@pytest.mark.gpu
def test_triton_kernels_match_the_reference_and_are_row_invariant():
    from miles_core.kernels import triton_linear, triton_ops
    from miles_core.kernels.attention import attention_reference

    torch.manual_seed(0)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(768, 512, device="cuda", dtype=torch.bfloat16) / 20
    full = triton_linear.linear(x, w)
    ref = torch.nn.functional.linear(x.float(), w.float())
    assert ((full.float() - ref).norm() / ref.norm()) < 1e-2
    for rows in (slice(5, 6), slice(0, 7), slice(100, 229)):
        assert torch.equal(triton_linear.linear(x[rows], w), full[rows])
    normed = triton_ops.rms_norm(x, torch.rand(512, device="cuda", dtype=torch.bfloat16), 1e-6)
    assert torch.equal(triton_ops.rms_norm(x[7:8], torch.ones(512, device="cuda", dtype=torch.bfloat16), 1e-6),
                       triton_ops.rms_norm(x, torch.ones(512, device="cuda", dtype=torch.bfloat16), 1e-6)[7:8])
    assert normed.shape == x.shape
    z = torch.randn(9, 151936, device="cuda")
    torch.testing.assert_close(triton_ops.log_softmax(z), torch.log_softmax(z, -1), rtol=0, atol=1e-5)
    assert torch.equal(triton_ops.log_softmax(z[3:4]), triton_ops.log_softmax(z)[3:4])
    q = torch.randn(2, 8, 100, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 4, 100, 128, device="cuda", dtype=torch.bfloat16), torch.randn(2, 4, 100, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(100, device="cuda")[None].expand(2, 100)
    out = triton_ops.attention(q, k, v, pos)
    ref = attention_reference(q.float(), k.float(), v.float(), pos, False)
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2
    # the query at position 60 as a decode step (keys 0..60 loaded) gives the prefill's bits
    decode = triton_ops.attention(q[:, :, 60:61], k[:, :, :61], v[:, :, :61], pos[:, 60:61])
    assert torch.equal(decode, out[:, :, 60:61])


@pytest.mark.gpu
def test_bf16_engine_matches_trainer_with_fp32_master_weights(model_dirs):
    """The training setup: fp32 master weights, bf16 compute on cast copies (as FSDP mixed
    precision), against a bf16 engine holding the same weights rounded once."""
    from miles_core.config import AlgoConfig, TrainConfig
    from miles_core.train.batch import TrainBatch
    from miles_core.train.native import NativeTrainer

    master = load_model(ModelConfig(source=model_dirs["qwen3"], device="cuda", dtype="float32"),
                        alignment_mode="invariant").model
    engine_side = load_model(ModelConfig(source=model_dirs["qwen3"], device="cuda", dtype="bfloat16"),
                             alignment_mode="invariant")
    tokens, lengths, rollout = _generate(engine_side, _prompts(32), 16, "cpu")
    batch = TrainBatch(tokens=tokens, response_lengths=lengths, loss_masks=[torch.ones(n) for n in lengths],
                       advantages=[torch.zeros(n) for n in lengths])
    trainer = NativeTrainer(copy.deepcopy(master), TrainConfig(compute_dtype="bfloat16", max_tokens_per_micro_batch=300),
                            AlgoConfig(), temperature=0.8, total_steps=1)
    sums = MismatchSums()
    for logp, ref in zip(trainer.compute_log_probs(batch), rollout):
        sums.add(logp, ref)
    stats = sums.metrics()
    assert stats["kl_k3"] == 0.0 and stats["bitwise_equal"] == 1.0, stats
