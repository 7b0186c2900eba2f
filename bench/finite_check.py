"""The check before every weight sync that no weight holds NaN/Inf (`train/finite.py`): the
grouped check (a multi-tensor L2 norm per 512 MiB window and dtype, one read from the device each)
against the check it replaced (one read per tensor), in the same run on 0.6B-shaped fp32 weights
(what the native trainer keeps).

GPU:  cd bench && python finite_check.py [--shape 0.6B]     (CPU smoke: --shape tiny --device cpu)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from miles_core.models.base import named_weights
from miles_core.train.finite import check_finite_weights

from align_overhead import random_model  # bench/ is on sys.path when run
from train_throughput import SHAPES


def per_tensor(named, step: int) -> None:
    """The check before: a read from the device for every tensor."""
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RuntimeError(f"step {step}: '{name}' is not finite")


def median_ms(fn, weights, device: str, repeats: int = 8) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(weights, 1)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="0.6B")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    model = random_model(dict(SHAPES[args.shape], vocab_size=49152), args.device, torch.float32)
    weights = [(name, tensor.detach()) for name, tensor in named_weights(model)]
    gigabytes = sum(t.nbytes for _, t in weights) / 1e9
    for label, fn in (("per tensor (before)", per_tensor), ("grouped (now)", check_finite_weights)) * 2:
        print(f"{label}: {len(weights)} tensors, {gigabytes:.2f} GB: median {median_ms(fn, weights, args.device):.2f} ms")


if __name__ == "__main__":
    main()
