"""Pick the fixed tile configuration of the batch-invariant Triton linear.

The invariant linear may not tune per problem size (a row's bits must not depend on M), so one
configuration serves every call. This times candidates on the matmul shapes of a Qwen3-0.6B
training step (M = 16384 rows) and of decode (M = 64), in bf16, against cuBLAS.

`--small` instead times `SMALL_M_CONFIG`, the tiles of decode-sized calls (at most `SMALL_M`
rows), per 0.6B and 4B decode shape at M = 64, 128 and 256, against cuBLAS and the default tiles:
whether they give the default tiles' bits (only then may they be used), which tiles the
card-fill rule of `triton_linear` picks, and the total of that choice.

Run on a GPU machine:  python bench/linear_configs.py [--small]
"""

from __future__ import annotations

import sys

import torch
import triton

from miles_core.kernels import triton_linear

SHAPES = [(16384, 1024, 4096), (16384, 2048, 1024), (16384, 1024, 3072), (16384, 3072, 1024),
          (1024, 1024, 151936), (64, 1024, 4096), (64, 3072, 1024), (64, 1024, 151936)]
CANDIDATES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 256, 64, 8, 3)]


# (N, K) of the 0.6B and 4B layers (q/k/v and gate/up fused as the engine runs them), and lm_head.
DECODE_NK = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024),
             (6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728)]


def small_main() -> None:
    torch.manual_seed(0)
    weights = {nk: torch.randn(nk, device="cuda", dtype=torch.bfloat16) / 30 for nk in DECODE_NK}
    small, default_tiles = triton_linear.SMALL_M_CONFIG, triton_linear.LINEAR_CONFIG["half"]
    for M in (64, 128, 256):
        xs = {nk: torch.randn(M, nk[1], device="cuda", dtype=torch.bfloat16) for nk in DECODE_NK}
        time = lambda fn, nk: triton.testing.do_bench(lambda: fn(xs[nk], weights[nk]), return_mode="median")
        launch = lambda config: lambda x, w: triton_linear._launch_linear(x, w, None, config)
        totals = {"cuBLAS": 0.0, "default": 0.0, "small": 0.0, "chosen": 0.0}
        for nk in DECODE_NK:  # per shape: which tiles the card-fill rule picks, and what each costs
            row = {"cuBLAS": time(torch.nn.functional.linear, nk), "default": time(launch(default_tiles), nk),
                   "small": time(launch(small), nk)}
            fills = triton_linear._default_tiles_fill_card(M, weights[nk])
            row["chosen"] = row["default"] if fills else row["small"]
            same = torch.equal(launch(small)(xs[nk], weights[nk]), launch(default_tiles)(xs[nk], weights[nk]))
            totals = {k: totals[k] + row[k] for k in totals}
            print(f"M={M} N,K={nk}: cuBLAS {row['cuBLAS']:.4f} ms, default {row['default']:.4f}, small {small} "
                  f"{row['small']:.4f} (same bits: {same}), rule picks {'default' if fills else 'small'}", flush=True)
        print(f"M={M} total: " + ", ".join(f"{k} {v:.4f} ms ({v / totals['cuBLAS']:.2f}x cuBLAS)"
                                            for k, v in totals.items()), flush=True)


def main() -> None:
    if "--small" in sys.argv:
        return small_main()
    torch.manual_seed(0)
    inputs = {s: (torch.randn(s[0], s[1], device="cuda", dtype=torch.bfloat16),
                  torch.randn(s[2], s[1], device="cuda", dtype=torch.bfloat16) / 30) for s in SHAPES}
    cublas = {s: triton.testing.do_bench(lambda x=x, w=w: torch.nn.functional.linear(x, w), return_mode="median")
              for s, (x, w) in inputs.items()}
    print("cuBLAS ms:", {f"{s[0]}x{s[1]}x{s[2]}": round(t, 4) for s, t in cublas.items()})
    results = []
    for config in CANDIDATES:
        triton_linear.LINEAR_CONFIG["half"] = config
        try:
            times = {s: triton.testing.do_bench(lambda x=x, w=w: triton_linear._linear_forward(x, w, None),
                                                return_mode="median")
                     for s, (x, w) in inputs.items()}
        except Exception as err:  # a config the compiler rejects (shared memory) is skipped
            print(config, "failed:", str(err).splitlines()[0][:120])
            continue
        train = sum(times[s] for s in SHAPES[:5]) / sum(cublas[s] for s in SHAPES[:5])
        decode = sum(times[s] for s in SHAPES[5:]) / sum(cublas[s] for s in SHAPES[5:])
        results.append((train, decode, config))
        print(config, f"train shapes {train:.3f}x cuBLAS, decode shapes {decode:.3f}x", flush=True)
    best = min(results, key=lambda r: r[0] + 0.5 * r[1])
    print("best:", best)


if __name__ == "__main__":
    main()
