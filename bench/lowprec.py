"""Low-precision GEMMs and rollout: block FP8 (W8A8) and group INT4 (W4A16) against bf16, same card.

GEMMs: y = x W^T at the MLP shapes of Qwen3-0.6B (1024 -> 3072 -> 1024), Qwen3-4B (2560 -> 9728
-> 2560) and one Qwen3-30B-A3B routed expert (2048 -> 768 -> 2048), for `--tokens` rows:
`F.linear` in bf16 (cuBLAS), `kernels.quant_gemm.fp8_block_linear` (activation quantisation per
token group of 128, then the GEMM; both timed) and `int4_group_linear` (groups of 128).
TFLOP/s = 2 M N K / time. On CUDA each call is replayed from a CUDA graph
(`triton.testing.do_bench_cudagraph`), as the engine's decode runs, so host launch time is not
counted; elsewhere the median of `--iters` wall-clock runs.

Rollout: the native engine (fast mode, CUDA graphs) on the 0.6B shape with random bf16 weights,
then the same model with every Linear but the output head swapped for FP8 and for INT4
`QuantLinear`s (`quant.modules.quantize_linears`, the weights `miles quantize` would write):
`--prompts` random 128-token prompts x `--new-tokens`, no eos, tok/s.

GPU:  python bench/lowprec.py --out bench/results/lowprec.md
CPU smoke test (seconds):  python bench/lowprec.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from miles_core.kernels import quant_gemm
from miles_core.quant.formats import QuantSpec
from miles_core.quant.fp8 import quantize_fp8_block
from miles_core.quant.int4 import pack_int4, quantize_int4
from miles_core.quant.modules import quantize_linears

from align_overhead import emit_report, random_model  # bench/ is on sys.path when run
from rollout_throughput import native_tokens_per_s, random_prompts
from train_throughput import SHAPES

GEMMS = {"0.6B": (1024, 3072), "4B": (2560, 9728), "30B-A3B expert": (2048, 768), "tiny": (64, 128)}
"""(hidden, intermediate): the up projection is (N=intermediate, K=hidden), the down one the reverse."""


def timed(fn, args) -> float:
    """Seconds of one call: graph-replayed on CUDA, else the median of `--iters` runs."""
    for _ in range(3):  # also runs the first-use checks, which cannot run inside a capture
        fn()
    if args.device == "cuda":
        import triton.testing

        return triton.testing.do_bench_cudagraph(fn, return_mode="median") / 1e3
    samples = []
    for _ in range(args.iters):
        begin = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def gemm_rows(args) -> list[dict]:
    rows = []
    gen = torch.Generator(device=args.device).manual_seed(0)
    for name in args.gemm_shapes:
        hidden, inter = GEMMS[name]
        for N, K in ((inter, hidden), (hidden, inter)):
            w = torch.randn(N, K, device=args.device, generator=gen).mul_(0.02).bfloat16()
            q8, s8 = quantize_fp8_block(w)
            q4, s4 = quantize_int4(w, 128 if K % 128 == 0 else 32)
            p4 = pack_int4(q4)
            for M in args.tokens:
                x = torch.randn(M, K, device=args.device, generator=gen).bfloat16()
                flops = 2 * M * N * K
                times = {"bf16": timed(lambda: F.linear(x, w), args),
                         "fp8": timed(lambda: quant_gemm.fp8_block_linear(x, q8, s8), args),
                         "int4": timed(lambda: quant_gemm.int4_group_linear(x, p4, s4), args)}
                rows.append(dict(shape=name, M=M, N=N, K=K, **{k: flops / t / 1e12 for k, t in times.items()}))
                print(rows[-1], flush=True)
    return rows


def rollout_rows(args) -> list[dict]:
    shape = SHAPES[args.rollout_shape]
    prompts = random_prompts(args.prompts, args.prompt_len, shape["vocab_size"])
    rows = []
    for precision in ("bf16", "fp8", "int4"):
        model = random_model(shape, args.device, torch.bfloat16)
        if precision != "bf16":
            quantize_linears(model, QuantSpec(precision, 32 if args.tiny else 128, ignore=("lm_head",)))
        weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        tps = native_tokens_per_s(model, "fast", prompts, args.new_tokens, args)
        rows.append(dict(precision=precision, tps=tps, weight_mib=weight_bytes / 2**20))
        print(rows[-1], flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def report(args, gemms: list[dict], rollouts: list[dict]) -> str:
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    kernels = "Triton" if quant_gemm.available() and args.device == "cuda" else "torch references (no Triton/CUDA)"
    lines = ["# Low precision (lowprec)", "",
             f"Card: {card}; date: {datetime.date.today()}; torch {torch.__version__}; quantised GEMMs: {kernels}; "
             f"command: `python {' '.join(sys.argv)}`.", "",
             "| shape | M | N | K | bf16 TFLOP/s | FP8 TFLOP/s | INT4 TFLOP/s | FP8 / bf16 | INT4 / bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in gemms:
        lines.append(f"| {r['shape']} | {r['M']} | {r['N']} | {r['K']} | {r['bf16']:.2f} | {r['fp8']:.2f} | "
                     f"{r['int4']:.2f} | {r['fp8'] / r['bf16']:.2f}x | {r['int4'] / r['bf16']:.2f}x |")
    lines += ["", f"Rollout, {args.rollout_shape} shape, {args.prompts} prompts x {args.new_tokens} new tokens "
              f"({args.prompt_len}-token prompts), fast mode:", "",
              "| weights | weight MiB | engine tok/s | vs bf16 |", "|---|---|---|---|"]
    base = rollouts[0]["tps"]
    for r in rollouts:
        lines.append(f"| {r['precision']} | {r['weight_mib']:,.1f} | {r['tps']:,.0f} | {r['tps'] / base:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gemm-shapes", default="0.6B,4B,30B-A3B expert")
    parser.add_argument("--tokens", default="1,16,256,4096", help="GEMM rows (M)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rollout-shape", default="0.6B")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--mem-fraction", type=float, default=0.85)
    parser.add_argument("--no-graphs", action="store_true", help="engine without CUDA graphs")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few tokens (smoke test)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.tiny:
        args.gemm_shapes, args.tokens, args.iters = "tiny", "1,7", 2
        args.rollout_shape, args.prompts, args.prompt_len, args.new_tokens = "tiny", 2, 16, 4
    args.gemm_shapes = args.gemm_shapes.split(",")
    args.tokens = [int(t) for t in args.tokens.split(",")]
    text = report(args, gemm_rows(args), rollout_rows(args))
    emit_report(text, args.out)


if __name__ == "__main__":
    main()
