"""Trainer throughput: tokens/s and MFU of one optimizer step (forward + backward + AdamW), the
native trainer (fast / invariant, padded / packed) and `transformers` in the same run, same weights.

Workload: Qwen3-0.6B and Qwen3-4B shapes (vocab 151936, tied embeddings), random weights (seed 0),
16 sequences x 1024 tokens (512 prompt + 512 response, distinct prompts), fp32 master weights,
bf16 compute, micro-batches of 8192 tokens. Native: `NativeTrainer.train_step` (GRPO loss,
chunked log-probs, grad clip 1.0). transformers: `AutoModelForCausalLM` (SDPA) under bf16
autocast, micro-batches of 8 sequences, `labels=` loss, grad clip 1.0, fused AdamW on CUDA.
The 4B shape runs with activation checkpointing on both sides (fp32 masters + AdamW state of 4B
parameters take 64 GB); with `--compile` it also tries the compiled trainer without checkpointing
at micro-batches of `--no-ckpt-micro-batch-tokens` (a row of nan when that does not fit). `--ragged` draws response lengths 128..1024 instead (padding matters).

FLOPs per step (model FLOPs, recomputation not counted): 6 * N * tokens + 6 * L * H * D * sum(s^2)
over sequences of length s, with N the parameter count (the tied embedding counted once, as the
lm_head matmul) and causal attention as half of the s^2 score and value matmuls.
MFU = FLOPs / time / peak (`--peak-tflops`, 790 bf16 dense for H100/H200 by the issue's figure).

`--fp8` adds the packed fast trainer with FP8 training GEMMs (`train.precision = "fp8"`), and every
native row's log shows its first step's loss and gradient norm (same master weights: comparable).
`--megatron` adds the megatron-core backend (one rank, bf16 compute, fp32 masters; not at 4B,
which needs activation checkpointing that backend refuses).

GPU:  python bench/train_throughput.py --out bench/results/train_throughput.md
CPU smoke test (seconds):  python bench/train_throughput.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import statistics
import sys
import time

import torch

from miles_core.config import AlgoConfig, TrainConfig
from miles_core.kernels import set_alignment_mode
from miles_core.train.batch import TrainBatch
from miles_core.train.native import NativeTrainer

from align_overhead import emit_report, random_model  # bench/ is on sys.path when run

COMMON = dict(model_type="qwen3", vocab_size=151936, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-6,
              rope_theta=1_000_000.0, tie_word_embeddings=True)
SHAPES = {
    "0.6B": dict(COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8),
    "4B": dict(COMMON, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8),
    "tiny": dict(COMMON, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
NATIVE = [("fast", False), ("fast", True), ("invariant", False), ("invariant", True)]  # (mode, packed)


def make_batch(num_seqs: int, seq_len: int, vocab: int, ragged: bool) -> TrainBatch:
    gen = torch.Generator().manual_seed(0)
    prompt = seq_len // 2
    lengths = [int(r) for r in torch.randint(prompt // 4, prompt + 1, (num_seqs,), generator=gen)] if ragged \
        else [seq_len - prompt] * num_seqs
    tokens = [torch.randint(0, vocab, (prompt + r,), generator=gen) for r in lengths]
    advantages = [torch.randn(1, generator=gen).expand(r).clone() for r in lengths]
    return TrainBatch(tokens=tokens, response_lengths=lengths, loss_masks=[torch.ones(r) for r in lengths],
                      advantages=advantages)


def step_flops(shape: dict, num_params: int, batch: TrainBatch) -> float:
    tokens = sum(len(t) for t in batch.tokens)
    attention = 6 * shape["num_hidden_layers"] * shape["num_attention_heads"] * shape["head_dim"] * \
        sum(len(t) ** 2 for t in batch.tokens)
    return 6 * num_params * tokens + attention


def timed(run, device: str, repeats: int) -> tuple[float, float]:
    """(median seconds of `run()` after one warm-up call, peak GPU memory in GB or 0)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    return statistics.median(times), peak


def native_step(master, mode: str, packed: bool, checkpointing: bool, compile_layers: bool,
                micro_batch_tokens: int = 8192, device: str = "cuda", precision: str = "bf16"):
    model = copy.deepcopy(master).to(device)
    set_alignment_mode(model, mode)
    cfg = TrainConfig(lr=1e-6, compute_dtype="bfloat16", max_tokens_per_micro_batch=micro_batch_tokens,
                      share_prompt_prefix=packed, pack_sequences=packed, activation_checkpointing=checkpointing,
                      compile=compile_layers, precision=precision)
    trainer = NativeTrainer(model, cfg, AlgoConfig(), temperature=1.0, total_steps=100)

    def run(batch: TrainBatch) -> dict:
        metrics = trainer.train_step(batch)
        if not hasattr(run, "first"):  # from the master weights, as every row's first step: comparable
            run.first = metrics
        return metrics
    return run


def megatron_step(master, micro_batch_tokens: int = 8192):
    """The megatron-core backend (one rank, bf16 compute, fp32 masters, padded micro-batches)."""
    from miles_core.train import build_trainer

    cfg = TrainConfig(backend="megatron", lr=1e-6, compute_dtype="bfloat16", max_tokens_per_micro_batch=micro_batch_tokens)
    trainer = build_trainer(cfg, AlgoConfig(), copy.deepcopy(master), temperature=1.0, total_steps=100)
    return lambda batch: trainer.train_step(batch)


def hf_step(master, shape: dict, device: str, checkpointing: bool):
    import transformers

    config = transformers.Qwen3Config(**{k: v for k, v in shape.items() if k != "model_type"})
    with torch.device(device):  # initialised on the card: a 4B fp32 init on the host takes minutes
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(master.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device == "cuda" or None)

    def run(batch: TrainBatch, rows: int):
        ids = torch.nn.utils.rnn.pad_sequence(batch.tokens, batch_first=True).to(device)
        for chunk in ids.split(rows):
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=chunk, labels=chunk).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def hf_timed(master, shape: dict, args, checkpointing: bool, batch: TrainBatch) -> tuple[float, float, int]:
    """(seconds, peak GB, rows per micro-batch) of the peer: micro-batches of 8 sequences as in the
    issue, halved while they do not fit (at 4B its fp32 logits of 8 x 1024 x 151936 do not)."""
    run = hf_step(master, shape, args.device, checkpointing)
    rows = 8
    while True:
        try:
            return (*timed(lambda: run(batch, rows), args.device, args.repeats), rows)
        except torch.OutOfMemoryError:
            if rows == 1:
                raise
        rows //= 2  # outside the handler: its traceback holds the failed micro-batch's activations
        free_memory(args.device)


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def peer_row(master, shape: dict, args, checkpointing: bool, batch: TrainBatch, flops: float, tokens: int) -> tuple:
    try:
        seconds, peak, rows = hf_timed(master, shape, args, checkpointing, batch)
        row = (f"transformers (micro-batches of {rows})", tokens / seconds, flops / seconds / (args.peak_tflops * 1e12),
               peak)
    except torch.OutOfMemoryError:
        row = ("transformers", float("nan"), float("nan"), float("nan"))
    free_memory(args.device)
    print(shape["hidden_size"], row, flush=True)
    return row


def measure(args, name: str) -> list[tuple[str, float, float, float]]:
    """Rows (config, tokens/s, MFU, peak GB) for one shape."""
    shape = SHAPES[name]
    # At 4B a second fp32 copy on the card beside the trainer's (weights, grads, AdamW: 60 GiB) does
    # not fit 80 GB, so the master stays in host memory and each config copies it over.
    master = random_model(shape, args.device)
    if name == "4B":
        master = master.cpu()
    num_params = sum(p.numel() for p in master.parameters())
    batch = make_batch(args.num_seqs, args.seq_len, shape["vocab_size"], args.ragged)
    flops, tokens = step_flops(shape, num_params, batch), sum(len(t) for t in batch.tokens)
    checkpointing = args.checkpointing or name == "4B"
    mb = args.micro_batch_tokens
    steps = {f"native {mode} {'packed' if packed else 'padded'}": (native_step, (master, mode, packed, checkpointing,
                                                                                  False, mb, args.device))
             for mode, packed in NATIVE}
    if args.compile:
        steps["native fast packed compiled"] = (native_step, (master, "fast", True, checkpointing, True, mb,
                                                                       args.device))
        if checkpointing and not args.checkpointing:  # the shape forced it: also try without, smaller micro-batches
            steps["native fast packed compiled no-ckpt"] = (native_step, (master, "fast", True, False, True,
                                                                          args.no_ckpt_micro_batch_tokens, args.device))
    if args.fp8:  # FP8 training GEMMs (row-wise `_scaled_mm`) beside the same row in bf16
        steps["native fast packed fp8"] = (native_step, (master, "fast", True, checkpointing, False, mb, args.device,
                                                         "fp8"))
    if args.megatron and not checkpointing:  # the megatron backend refuses activation checkpointing
        steps["megatron"] = (megatron_step, (master, mb))
    if args.configs:  # a subset of the native rows (the peer always runs: every ratio is against it)
        wanted = {c.strip() for c in args.configs.split(",")}
        steps = {label: step for label, step in steps.items() if label.removeprefix("native ") in wanted}
    rows = [peer_row(master, shape, args, checkpointing, batch, flops, tokens)]  # first: on an empty card
    for label, (factory, factory_args) in steps.items():
        try:
            run = factory(*factory_args)
            seconds, peak = timed(lambda: run(batch), args.device, args.repeats)
            rows.append((label, tokens / seconds, flops / seconds / (args.peak_tflops * 1e12), peak))
            first = getattr(run, "first", None)
            if first is not None:
                print(f"{name} {label}: first step loss {first.get('loss'):.6g}, "
                      f"grad norm {first.get('grad_norm'):.6g}")
        except torch.OutOfMemoryError:
            rows.append((label, float("nan"), float("nan"), float("nan")))
        run = None
        free_memory(args.device)
        print(name, rows[-1], flush=True)
    return rows


def report(args, results: dict[str, list]) -> str:
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = ["# Trainer throughput (train_throughput)", "",
             f"Card: {card}; date: {datetime.date.today()}; torch {torch.__version__}; "
             f"command: `python {' '.join(sys.argv)}`.",
             f"{args.num_seqs} x {args.seq_len} tokens{' (ragged responses)' if args.ragged else ''}, one AdamW step, "
             f"bf16 compute, fp32 masters; native micro-batches of {args.micro_batch_tokens} tokens, transformers "
             f"micro-batches of 8 sequences (fewer where 8 do not fit: the row says); MFU against {args.peak_tflops:g} TFLOP/s.", ""]
    for name, rows in results.items():
        hf = next(r[1] for r in rows if r[0].startswith("transformers"))
        lines += [f"## {name}", "", "| config | tokens/s | MFU | peak GB | vs transformers |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {tps:,.0f} | {mfu:.1%} | {peak:.1f} | {tps / hf:.2f}x |" for label, tps, mfu, peak in rows]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="0.6B,4B")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, 4 x 64 tokens (smoke test)")
    parser.add_argument("--num-seqs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--ragged", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing at every shape")
    parser.add_argument("--compile", action="store_true", help="also time the packed fast trainer with train.compile")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp8", action="store_true",
                        help="also time the packed fast trainer with train.precision = fp8")
    parser.add_argument("--megatron", action="store_true", help="also time the megatron-core backend (one rank)")
    parser.add_argument("--configs", default="", help="comma-separated subset of the native rows, e.g. "
                        "'fast packed,fast packed compiled' (default: all)")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192,
                        help="native trainer's train.max_tokens_per_micro_batch (transformers: micro-batches of 8)")
    parser.add_argument("--no-ckpt-micro-batch-tokens", type=int, default=2048,
                        help="micro-batch of the compiled row without activation checkpointing at 4B")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.num_seqs, args.seq_len, args.repeats = "tiny", 4, 64, 1
    results = {name: measure(args, name) for name in args.shapes.split(",")}
    text = report(args, results)
    emit_report(text, args.out)


if __name__ == "__main__":
    main()
