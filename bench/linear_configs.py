"""Pick the fixed tile configuration of the batch-invariant Triton linear.

The invariant linear may not tune per problem size (a row's bits must not depend on M), so one
configuration serves every call. This times candidates on the matmul shapes of a Qwen3-0.6B
training step (M = 16384 rows) and of decode (M = 64), in bf16, against cuBLAS.

`--small` instead times candidates for `SMALL_M_CONFIG`, the tiles of decode-sized calls (at most
`SMALL_M` rows), on the 0.6B and 4B decode shapes at M = 64 and 256, against cuBLAS and the
default tiles, and says whether each gives the default tiles' bits (only such a one may be used).

Run on a GPU machine:  python bench/linear_configs.py [--small]
"""

from __future__ import annotations

import sys

import torch
import triton

from miles_core.kernels import triton_ops

SHAPES = [(16384, 1024, 4096), (16384, 2048, 1024), (16384, 1024, 3072), (16384, 3072, 1024),
          (1024, 1024, 151936), (64, 1024, 4096), (64, 3072, 1024), (64, 1024, 151936)]
CANDIDATES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 256, 64, 8, 3)]


# (N, K) of the 0.6B and 4B layers (q/k/v and gate/up fused as the engine runs them), and lm_head.
DECODE_NK = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024),
             (6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728)]
SMALL_CANDIDATES = [(64, 32, 64, 4, 4), (64, 64, 64, 4, 4), (64, 32, 64, 4, 3), (64, 64, 64, 4, 3),
                    (64, 128, 64, 4, 3), (128, 32, 64, 4, 4), (64, 16, 64, 4, 4)]


def small_main() -> None:
    torch.manual_seed(0)
    weights = {nk: torch.randn(nk, device="cuda", dtype=torch.bfloat16) / 30 for nk in DECODE_NK}
    for M in (64, 256):
        xs = {nk: torch.randn(M, nk[1], device="cuda", dtype=torch.bfloat16) for nk in DECODE_NK}
        bench = lambda fn: sum(triton.testing.do_bench(lambda nk=nk: fn(xs[nk], weights[nk]), return_mode="median")
                               for nk in DECODE_NK)
        cublas = bench(torch.nn.functional.linear)
        default = bench(lambda x, w: triton_ops._launch_linear(x, w, None, triton_ops.LINEAR_CONFIG["half"]))
        print(f"M={M}: cuBLAS {cublas:.4f} ms, default tiles {default:.4f} ms ({default / cublas:.2f}x)", flush=True)
        for config in SMALL_CANDIDATES:
            try:
                same = all(torch.equal(triton_ops._launch_linear(xs[nk], weights[nk], None, config),
                                       triton_ops._launch_linear(xs[nk], weights[nk], None,
                                                                 triton_ops.LINEAR_CONFIG["half"])) for nk in DECODE_NK)
                ms = bench(lambda x, w, c=config: triton_ops._launch_linear(x, w, None, c))
            except Exception as err:  # noqa: BLE001 - a config the compiler rejects is skipped
                print(" ", config, "failed:", str(err).splitlines()[0][:120])
                continue
            print(f"  {config}: {ms:.4f} ms ({ms / cublas:.2f}x cuBLAS), same bits as the default: {same}", flush=True)


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
        triton_ops.LINEAR_CONFIG["half"] = config
        try:
            times = {s: triton.testing.do_bench(lambda x=x, w=w: triton_ops._linear_forward(x, w, None), return_mode="median")
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
