"""Cost of batch-invariant kernels: engine and trainer tokens/s in `fast` vs `invariant` mode.

Model: Qwen3-0.6B-shaped (hidden 1024, 28 layers, 16 heads / 8 KV heads, head dim 128, MLP 3072,
vocab 151936, tied embeddings), random weights, bf16 on one GPU.
Engine: 64 prompts of 128 random tokens, 128 new tokens each, temperature 1.
Trainer: one optimizer step (forward + backward + AdamW) on 16 sequences of 1024 tokens
(512 prompt + 512 response), bf16 compute on fp32 master weights.
Also checks that in invariant mode the trainer's log-probs equal the engine's bit for bit.

Run on a GPU machine:  python bench/align_overhead.py [--out results.md]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time

import torch

from miles_core.config import AlgoConfig, EngineConfig, SamplingConfig, TrainConfig
from miles_core.engine.native import NativeEngine
from miles_core.engine.protocol import GenerateRequest
from miles_core.kernels import set_alignment_mode
from miles_core.algo.mismatch import MismatchSums
from miles_core.checkpoint.loading import materialize
from miles_core.models.registry import build_model
from miles_core.train.batch import TrainBatch
from miles_core.train.native import NativeTrainer

QWEN3_0_6B = dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True)


class _NoText:
    """The engine only decodes text for stop strings and the response string; not measured here."""

    def decode(self, ids, skip_special_tokens=True):
        return ""


def emit_report(text: str, out: str) -> None:
    """Print a benchmark's markdown report and write it to `out` when given (every benchmark here)."""
    print(text)
    if out:
        with open(out, "w") as handle:
            handle.write(text)


def random_model(config: dict, device: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The native model of `config` with N(0, 0.02) weights (seed 0) and unit norms; the other
    benchmarks build theirs with it too."""
    with torch.device("meta"):
        model = build_model(config)
    model = materialize(model, torch.device(device), dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def build(device: str) -> torch.nn.Module:
    return random_model(QWEN3_0_6B, device)


def median_seconds(run, repeats: int = 3) -> float:
    """Median wall time of `run()` over `repeats` calls, the GPU drained before and after each."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_engine(model, mode: str, prompts, new_tokens: int) -> float:
    set_alignment_mode(model, mode)
    engine = NativeEngine(model, _NoText(), EngineConfig(max_batch_size=64), eos_token_ids=(),
                          max_position_embeddings=4096)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)
    requests = [GenerateRequest(input_ids=p, sampling=sampling, seed=i) for i, p in enumerate(prompts)]
    engine.generate(requests[:8])  # warm-up (compilation, allocator)
    return len(prompts) * new_tokens / median_seconds(lambda: engine.generate(requests))


def time_trainer(master, mode: str, batch: TrainBatch) -> float:
    model = copy.deepcopy(master)
    set_alignment_mode(model, mode)
    trainer = NativeTrainer(model, TrainConfig(lr=1e-6, compute_dtype="bfloat16", max_tokens_per_micro_batch=8192),
                            AlgoConfig(), temperature=1.0, total_steps=10)
    trainer.train_step(batch)  # warm-up
    seconds = median_seconds(lambda: trainer.train_step(batch))
    trainer = model = None  # free the GPU memory before the next mode
    torch.cuda.empty_cache()
    return sum(len(t) for t in batch.tokens) / seconds


def invariant_gap(master) -> dict[str, float]:
    """Engine (bf16 weights) vs trainer (bf16 casts of fp32 masters), both invariant."""
    engine_model = copy.deepcopy(master).to(torch.bfloat16)
    set_alignment_mode(engine_model, "invariant")
    engine = NativeEngine(engine_model, _NoText(), EngineConfig(max_batch_size=16), eos_token_ids=(),
                          max_position_embeddings=4096)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 151936, (int(n),), generator=gen).tolist() for n in torch.randint(16, 200, (16,), generator=gen)]
    outs = engine.generate([GenerateRequest(input_ids=p, sampling=SamplingConfig(max_new_tokens=64), seed=i)
                            for i, p in enumerate(prompts)])
    tokens = [torch.tensor(p + o[0].output_ids) for p, o in zip(prompts, outs)]
    batch = TrainBatch(tokens=tokens, response_lengths=[64] * 16, loss_masks=[torch.ones(64)] * 16,
                       advantages=[torch.zeros(64)] * 16)
    model = copy.deepcopy(master)
    set_alignment_mode(model, "invariant")
    trainer = NativeTrainer(model, TrainConfig(compute_dtype="bfloat16"), AlgoConfig(), temperature=1.0, total_steps=1)
    sums = MismatchSums()
    for logp, o in zip(trainer.compute_log_probs(batch), outs):
        sums.add(logp, torch.tensor(o[0].output_logprobs))
    return sums.metrics()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    master = build("cuda")
    engine_model = copy.deepcopy(master).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 151936, (128,), generator=gen).tolist() for _ in range(64)]
    tokens = [torch.randint(0, 151936, (1024,), generator=gen) for _ in range(16)]
    batch = TrainBatch(tokens=tokens, response_lengths=[512] * 16, loss_masks=[torch.ones(512)] * 16,
                       advantages=[torch.randn(1, generator=gen).expand(512).clone() for _ in range(16)])
    rows = {}
    for mode in ("fast", "invariant"):
        rows[mode] = (time_engine(engine_model, mode, prompts, args.new_tokens), time_trainer(master, mode, batch))
        print(mode, rows[mode], flush=True)
    gap = invariant_gap(master)
    card = torch.cuda.get_device_name()
    lines = [
        "# Cost of batch-invariant kernels (align_overhead)",
        "",
        f"Card: {card}; date: {datetime.date.today()}; torch {torch.__version__}; command: `python bench/align_overhead.py`.",
        "Model: Qwen3-0.6B shape, random weights, bf16. Engine: 64 prompts x 128 tokens, 128 new tokens. "
        "Trainer: one AdamW step on 16 x 1024 tokens (bf16 compute, fp32 masters).",
        "",
        "| mode | engine tok/s | trainer tok/s |",
        "|---|---|---|",
    ]
    for mode, (eng, tr) in rows.items():
        lines.append(f"| {mode} | {eng:,.0f} | {tr:,.0f} |")
    e_ratio, t_ratio = rows["fast"][0] / rows["invariant"][0], rows["fast"][1] / rows["invariant"][1]
    lines += ["", f"Invariant costs {e_ratio:.2f}x fast in the engine and {t_ratio:.2f}x in the trainer (goal <= 1.3x).",
              "", f"Invariant engine vs trainer on 16 samples x 64 tokens (bf16): max |delta logprob| = "
              f"{gap['max_abs_diff']:.3e}, bitwise equal = {gap['bitwise_equal']:.2%}, KL k3 = {gap['kl_k3']:.3e}."]
    text = "\n".join(lines) + "\n"
    emit_report(text, args.out)


if __name__ == "__main__":
    main()
