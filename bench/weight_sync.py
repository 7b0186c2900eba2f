"""Seconds and GB/s of one weight sync per transport, against the bounds measured in the same run.

For each model shape (Qwen3 at 0.6B and 4B with the SmolLM2 vocabulary, random bf16 weights saved
as a HF checkpoint), the trainer side pushes the full bf16 state dict (`sync.bucket_mb` buckets)
to an engine, timed two ways on the same engine: handed as one `KeptWeights` tuple, the same
object each push (what the native trainer's `export_weights` hands out while its parameters stay
in place: a transport reuses what it worked out for it), and as a plain iterator of (name,
tensor) pairs (gathered or generated weights: every weight looked at each push). Transports:

- `inprocess`: a native engine in this process on GPU 0 (one multi-tensor copy a bucket);
- `cuda_ipc`: a `miles serve` process on GPU 0 (colocated): the first warm-up push is staged (buckets
  through one shared buffer), the timed ones go direct (the server maps the pushed tensors where
  they lie, since they stay in place as a trainer's parameters do: one call, one copy), each
  call over the server's local weight channel (a Unix socket beside its HTTP API);
- `nccl`: a `miles serve` process on GPU 1: SGLang's `/init_weights_update_group` +
  `/update_weights_from_distributed`, one flattened broadcast per bucket;
- `disk`: the same server, a HF checkpoint written and loaded by path (for scale).

Bounds, measured here: the device-to-device copy of the same bytes on GPU 0 (`copy_`), and the
all-reduce bus bandwidth between GPU 0 and GPU 1 (two NCCL ranks, 1 GiB, busbw = 2(n-1)/n x
bytes / time). Goals (many-GPU issue): in-process and CUDA IPC within 2x of the copy bound, NCCL
within 2x of the bus bandwidth. Every push ends with the engine serving the new version; times
are the median of `--repeats` pushes after three warm-up pushes (which also set up the NCCL group).

GPU (2 GPUs for nccl/disk):  python bench/weight_sync.py --out bench/results/weight_sync.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from miles_core.launch.local import free_port
from miles_core.models.kept_weights import KeptWeights

from align_overhead import random_model  # bench/ is on sys.path when run
from train_throughput import SHAPES

API_KEY = "weight-sync-bench"


def copy_bound(nbytes: int, repeats: int = 5) -> float:
    """GB/s of a device-to-device copy of `nbytes` on GPU 0."""
    src, dst = (torch.empty(nbytes, dtype=torch.uint8, device="cuda:0") for _ in range(2))
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:]) / 1e9


def _allreduce_rank(rank: int, port: int, nbytes: int, out) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    buffer = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=f"cuda:{rank}")
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if rank == 0:
        out.put(nbytes / statistics.median(times[1:]) / 1e9)  # 2(n-1)/n = 1 for n = 2
    dist.destroy_process_group()


def nccl_bus_bandwidth(nbytes: int = 1 << 30) -> float:
    context = mp.get_context("spawn")
    out = context.Queue()
    port = free_port()
    ranks = [context.Process(target=_allreduce_rank, args=(r, port, nbytes, out)) for r in range(2)]
    for p in ranks:
        p.start()
    value = out.get(timeout=300)
    for p in ranks:
        p.join(timeout=60)
    return value


def start_server(model_dir: Path, gpu: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`miles serve` on one GPU; returns the process and its URL once it answers /health."""
    return launch_serve(model_dir, log, "--api-key", API_KEY, "--set", "model.dtype=bfloat16",
                        "--set", "model.device=cuda", env={**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)})


def launch_serve(model_dir: Path, log: Path, *options: str, env: dict) -> tuple[subprocess.Popen, str]:
    """`miles serve --model model_dir *options` at a free port, its output in `log`; the process
    and its URL once it answers /health."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "miles_cli.app", "serve", "--model", str(model_dir), "--port", str(port), *options]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise RuntimeError(f"miles serve exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"miles serve did not come up: {log.read_text()[-2000:]}")


WARMUP = 3
"""Pushes before the timed ones: a first `cuda_ipc` push is staged, the first direct one maps the
trainer's memory, and a copy plan's launch is captured in a CUDA graph on its second run."""


def timed_pushes(sync, weights, repeats: int, profile: bool = False, *, kept: bool, first_version: int = 1) -> float:
    """Median seconds of `repeats` pushes after `WARMUP` ones: `weights` (a `KeptWeights`) itself
    each push if `kept`, else a fresh iterator over it."""
    times = []
    for version in range(first_version, first_version + repeats + WARMUP):
        torch.cuda.synchronize()
        start = time.perf_counter()
        sync.push(weights if kept else iter(weights), version=str(version))
        torch.cuda.synchronize()  # an in-process push returns once its copies are queued
        times.append(time.perf_counter() - start)
    if profile:
        print_push_profile(sync, weights if kept else iter(weights), version=f"{first_version + repeats + WARMUP}p")
    return statistics.median(times[WARMUP:])


def timed_both_ways(sync, weights, repeats: int, profile: bool) -> tuple[float, float]:
    """(seconds handed as the kept tuple, seconds handed as an iterator) on the same engine."""
    kept = timed_pushes(sync, weights, repeats, profile, kept=True)
    return kept, timed_pushes(sync, weights, repeats, profile, kept=False, first_version=repeats + WARMUP + 2)


def print_push_profile(sync, weights, version: str) -> None:
    """One more push under cProfile: where the trainer side's host time goes (HTTP waits, packing)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    sync.push(weights, version=version)
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def measure_shape(name: str, args, work: Path) -> tuple[list[tuple[str, float, float]], int]:
    """Rows (transport, seconds handed kept, seconds handed as an iterator) for one model shape,
    and the bytes pushed."""
    from miles_core.checkpoint.loading import load_model
    from miles_core.config import EngineConfig, ModelConfig, SyncConfig
    from miles_core.engine import build_engine
    from miles_core.engine.http import SGLangHttpEngine
    from miles_core.sync import SyncContext, build_weight_sync

    model_dir = save_random_checkpoint(name, work / name, Path(args.tokenizer))
    loaded = load_model(ModelConfig(source=str(model_dir), device="cuda", dtype="bfloat16"))
    weights = KeptWeights((k, v.detach().clone()) for k, v in loaded.model.state_dict().items())
    nbytes = sum(v.numel() * v.element_size() for _, v in weights)
    context = SyncContext(hf_config=loaded.hf_config, source_dir=model_dir, work_dir=work / f"{name}-disk")
    rows = []
    for transport in args.transports.split(","):
        try:
            if transport == "inprocess":
                engine = build_engine(EngineConfig(), loaded)
                sync = build_weight_sync(SyncConfig(transport="inprocess", bucket_mb=args.bucket_mb), engine)
                seconds = timed_both_ways(sync, weights, args.repeats, args.profile)
            else:
                gpu = 0 if transport == "cuda_ipc" else 1
                process, url = start_server(model_dir, gpu, work / f"{name}-{transport}.log")
                try:
                    engine = SGLangHttpEngine(EngineConfig(backend="sglang", urls=[url], api_key=API_KEY), urls=[url])
                    sync = build_weight_sync(SyncConfig(transport=transport, bucket_mb=args.bucket_mb), engine, context)
                    seconds = timed_both_ways(sync, weights, args.repeats, args.profile)
                    getattr(sync, "close", lambda: None)()
                finally:
                    process.terminate()
                    process.wait(timeout=60)
            rows.append((transport + _way(sync), *seconds))
        except Exception as err:  # noqa: BLE001 - a failing transport is reported, the others still run
            rows.append((f"{transport} (failed: {str(err).splitlines()[0][:160]})", float("nan"), float("nan")))
        print(name, rows[-1], flush=True)
    return rows, nbytes


def _way(sync) -> str:
    """' (direct, local channel)' when the cuda_ipc pushes named the tensors where they lie, over
    the server's local weight channel."""
    while hasattr(sync, "inner"):
        sync = sync.inner
    ways = ["direct"] if getattr(sync, "num_direct", 0) else []
    channels = getattr(getattr(sync, "engine", None), "_channels", None)
    ways += ["local channel"] if channels and channels[1] else []
    return f" ({', '.join(ways)})" if ways else ""


def save_random_checkpoint(name: str, folder: Path, tokenizer: Path) -> Path:
    """The shape with the tokenizer's vocabulary (the servers need a tokenizer), random bf16 weights."""
    import transformers

    from miles_core.checkpoint.hf import save_hf_checkpoint

    vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer))
    shape = dict(SHAPES[name], vocab_size=vocab)
    config = transformers.Qwen3Config(**{k: v for k, v in shape.items() if k != "model_type"})
    model = random_model(shape, "cuda", torch.bfloat16)
    save_hf_checkpoint(folder, model.state_dict().items(), config.to_dict(), source_dir=tokenizer)
    return folder


def report(args, bounds: dict, results: dict) -> str:
    card = torch.cuda.get_device_name()
    lines = ["# Weight sync (weight_sync)", "",
             f"Card: {card} x {torch.cuda.device_count()}; date: {datetime.date.today()}; torch {torch.__version__}; "
             f"command: `python {' '.join(sys.argv)}`. bf16 weights, buckets of {args.bucket_mb} MiB, median of "
             f"{args.repeats} pushes after {WARMUP} warm-up pushes.", "",
             f"Bounds measured in this run: device-to-device copy on GPU 0 {bounds['copy']:.0f} GB/s; "
             f"NCCL all-reduce bus bandwidth GPU 0 <-> GPU 1 {bounds['nccl']:.0f} GB/s.", ""]
    for name, (rows, nbytes) in results.items():
        lines += [f"## {name} ({nbytes / 1e9:.2f} GB)", "",
                  "| transport | bound | kept tuple: ms | GB/s | share of bound | iterator: ms | GB/s | share of bound |",
                  "|---|---|---|---|---|---|---|---|"]
        for transport, *seconds in rows:
            bound = bounds["nccl"] if transport.startswith("nccl") else bounds["copy"]
            label = "NCCL bus" if transport.startswith("nccl") else "copy"
            cells = [f"{s * 1e3:.2f} | {nbytes / s / 1e9:.1f} | {nbytes / s / 1e9 / bound:.1%}" for s in seconds]
            lines.append(f"| {transport} | {label} {bound:.0f} GB/s | {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="0.6B,4B")
    parser.add_argument("--transports", default="inprocess,cuda_ipc,nccl,disk")
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one extra push per transport")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", default=".gpuassets/smollm2-tok", help="tokenizer folder (SmolLM2's)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    bounds = {"copy": copy_bound(1 << 30), "nccl": nccl_bus_bandwidth() if torch.cuda.device_count() > 1 else float("nan")}
    print(bounds, flush=True)
    with tempfile.TemporaryDirectory(prefix="weight_sync_") as tmp:
        results = {name: measure_shape(name, args, Path(tmp)) for name in args.shapes.split(",")}
    text = report(args, bounds, results)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
