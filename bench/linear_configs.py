"""Pick the fixed tile configuration of the batch-invariant Triton linear.

The invariant linear may not tune per problem size (a row's bits must not depend on M), so one
configuration serves every call. This times candidates on the matmul shapes of a Qwen3-0.6B
training step (M = 16384 rows) and of decode (M = 64), in bf16, against cuBLAS.

Run on a GPU machine:  python bench/linear_configs.py
"""

from __future__ import annotations

import torch
import triton

from miles_core.kernels import triton_ops

SHAPES = [(16384, 1024, 4096), (16384, 2048, 1024), (16384, 1024, 3072), (16384, 3072, 1024),
          (1024, 1024, 151936), (64, 1024, 4096), (64, 3072, 1024), (64, 1024, 151936)]
CANDIDATES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (256, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 256, 64, 8, 3)]


def main() -> None:
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
