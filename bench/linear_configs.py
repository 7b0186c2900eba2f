"""Pick the fixed tile configuration of the batch-invariant Triton linear.

The invariant linear may not tune per problem size (a row's bits must not depend on M), so one
configuration serves every call. This times candidates on the matmul shapes of a Qwen3-0.6B
training step (M = 16384 rows) and of decode (M = 64), in bf16, against cuBLAS.

`--small` instead times the tiles of decode-sized calls (at most `SMALL_M` rows: `SMALL_M_CONFIG`
and `SMALL_M_WIDE_CONFIG`), per 0.6B and 4B decode shape at M = 64, 128 and 256, against cuBLAS
and the default tiles, inside CUDA graphs (`do_bench_cudagraph`: plain `do_bench` times a 5-10 us
kernel by its Python launch): whether they give the default tiles' bits (only then may they be
used), which tiles the card-fill rules of `triton_linear` pick, and the total of that choice.

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
    tiles = {"default": triton_linear.LINEAR_CONFIG["half"], "narrow": triton_linear.SMALL_M_CONFIG,
             "wide": triton_linear.SMALL_M_WIDE_CONFIG}
    for M in (64, 128, 256):
        xs = {nk: torch.randn(M, nk[1], device="cuda", dtype=torch.bfloat16) for nk in DECODE_NK}
        time = lambda fn, nk: triton.testing.do_bench_cudagraph(lambda: fn(xs[nk], weights[nk]), return_mode="median")
        launch = lambda config: lambda x, w: triton_linear._launch_linear(x, w, None, config)
        totals = dict.fromkeys(["cuBLAS", *tiles, "chosen"], 0.0)
        for nk in DECODE_NK:  # per shape: which tiles the card-fill rules pick, and what each costs
            w = weights[nk]
            row = {"cuBLAS": time(torch.nn.functional.linear, nk)} | {k: time(launch(c), nk) for k, c in tiles.items()}
            fills = triton_linear._default_tiles_fill_card(M, w)
            pick = "default" if fills else "wide" if triton_linear._small_tiles(M, w) == tiles["wide"] else "narrow"
            row["chosen"] = row[pick]
            same = {k: torch.equal(launch(c)(xs[nk], w), launch(tiles["default"])(xs[nk], w)) for k, c in tiles.items()}
            totals = {k: totals[k] + row[k] for k in totals}
            print(f"M={M} N,K={nk}: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in row.items())
                  + f"; same bits as default: {same}; rules pick {pick}", flush=True)
        print(f"M={M} total: " + ", ".join(f"{k} {v * 1e3:.1f} us ({v / totals['cuBLAS']:.2f}x cuBLAS)"
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
