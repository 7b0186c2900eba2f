"""Host cost of the `nccl` transport's per-bucket call: over HTTP (SGLang's route, what any server
gets) against over a `miles serve`'s local weight channel, in the same run on the same server.

A push of one bucket over gloo, from this process to a `miles serve` subprocess on CPU, of a model
with the 0.6B layout's 311 tensors at tiny widths (0.3 MB): the bytes cost next to nothing, so
the push time is the calls both ends make (the trainer's body, the server's parse and checks, the
update, the answer). HTTP is forced the way a server whose channel does not take the route is
reached. Runs on any machine: no GPU.

    cd bench && python sync_call_overhead.py [--repeats 40] [--out results/sync_call_overhead.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from miles_core.checkpoint.hf import save_hf_checkpoint
from miles_core.checkpoint.sources import resolve_model_source
from miles_core.config import EngineConfig, SyncConfig
from miles_core.engine.http import SGLangHttpEngine
from miles_core.engine.local_channel import TENSOR_ROUTE
from miles_core.models.kept_weights import KeptWeights
from miles_core.sync.nccl import NcclSync

from align_overhead import random_model  # bench/ is on sys.path when run
from train_throughput import SHAPES
from weight_sync import launch_serve

NARROW = dict(SHAPES["tiny"], num_hidden_layers=28, hidden_size=16, intermediate_size=32, head_dim=4,
              vocab_size=320)
"""The 0.6B layout (28 layers: 311 tensors) at tiny widths, with tiny-qwen3's vocabulary."""


def narrow_checkpoint(folder: Path) -> tuple[Path, KeptWeights]:
    tokenizer = Path(resolve_model_source("tiny-qwen3"))
    model = random_model(NARROW, "cpu", torch.float32)
    config = transformers.Qwen3Config(**{k: v for k, v in NARROW.items() if k != "model_type"})
    save_hf_checkpoint(folder, model.state_dict().items(), config.to_dict(), source_dir=tokenizer)
    return folder, KeptWeights((k, v.detach().clone()) for k, v in model.state_dict().items())


def median_ms(sync: NcclSync, weights: KeptWeights, repeats: int, first: int) -> float:
    times = []
    for version in range(first, first + repeats + 3):
        start = time.perf_counter()
        sync.push(weights, version=str(version))
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    model_dir, weights = narrow_checkpoint(work / "narrow")
    process, url = launch_serve(model_dir, work / "serve.log", "--allow-unauthenticated-weight-updates",
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        engine = SGLangHttpEngine(EngineConfig(backend="sglang", urls=[url]), urls=[url])
        sync = NcclSync(engine, SyncConfig(transport="nccl", timeout_s=0))  # on this thread: the call alone
        results: dict[str, list[float]] = {"local weight channel": [], "HTTP": []}
        for block in range(4):
            way = "local weight channel" if block % 2 == 0 else "HTTP"
            sync.push(weights, version=f"open-{block}")  # (re)opens the channel
            if way == "HTTP":
                for channel in engine._channels[1]:
                    channel.routes = frozenset({TENSOR_ROUTE})  # as a server whose channel lacks the route
            results[way].append(median_ms(sync, weights, args.repeats, 1000 * (block + 1)))
            engine.close_weight_channels()
        sync.close()
    finally:
        process.terminate()
        process.wait(timeout=60)
    report(args, len(weights), sum(t.nbytes for _, t in weights), results)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def report(args, num_tensors: int, nbytes: int, results: dict[str, list[float]]) -> None:
    lines = ["# nccl bucket call: HTTP against the local weight channel (sync_call_overhead)", "",
             f"Card: CPU ({cpu_name()}, {os.cpu_count()} cores); "
             f"date: {datetime.date.today()}; torch {torch.__version__}",
             f"command: `cd bench && python sync_call_overhead.py --repeats {args.repeats}`", "",
             f"One bucket of {num_tensors} tensors ({nbytes / 1e6:.2f} MB) over gloo to one `miles serve`;"
             f" median ms of {args.repeats} pushes, two blocks each way.", "",
             "| call over | block 1: ms | block 2: ms |", "|---|---|---|"]
    lines += [f"| {way} | {times[0]:.2f} | {times[1]:.2f} |" for way, times in results.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
