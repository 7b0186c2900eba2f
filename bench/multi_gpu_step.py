"""GRPO step time of one fixed workload on 1, 2 and 3+ GPUs (as many as the machine has), one run.

Workload: W1 of `grpo_step.py` scaled up so a second GPU has work: `--prompts` prompts x 8
samples a step (default 32 x 8 = 256 sequences), 128 new tokens, one optimizer step, the same
checkpoint and prompts for every placement. Placements:

- `1 GPU`: engine and trainer in one process on GPU 0 (the default);
- `2 GPUs, engine apart, sync` / `... async`: the trainer on GPU 0, a `miles serve` engine
  launched on GPU 1 (`engine.launch`, `engine.server = "miles"`, `engine.num_gpus = 1`),
  weights over NCCL (`sync.transport = "nccl"`); async overlaps the next step's generation with
  training (`loop.mode = "async"`, TIS on);
- `1 GPU, colocated`: a `miles serve` engine on GPU 0 beside the trainer (`engine.colocate`):
  weights by CUDA IPC, the engine releases its memory (dropping its weights: the sync rewrites
  them) while the trainer trains and the trainer moves its optimizer state to the host while the
  engine generates; two variants at the end of the list: the native engine colocated in the
  trainer's process, and `miles serve` keeping its weights in host memory while released
  (`engine.weights_cpu_backup`), what the drop saves;
- `2 GPUs (FSDP)`: `miles train --nproc-per-node 2` (two trainer ranks, NCCL, the engine in rank
  0's process); its time is the run's `perf/step_time`, not the wall time between steps; and at
  the end of the list `1 GPU (FSDP)`, one rank: what FSDP's sharding machinery costs against the
  native trainer on the same GPU; both once more with `train.fsdp_reshard = "step"` (parameters
  gathered and gradients unreduced until a step's last backward); last, two `step` ranks with an
  engine in each rank's process (`engine.ranks = "all"`: both GPUs generate);
- `3 GPUs (2 engines on GPUs 1-2), async` (machines with 3 or more GPUs): the trainer keeps GPU
  0, requests are spread over the two engines.

Step time: median of `perf/step_time` over steps 2..N (async: wall time between steps, the
trainer's view). Scaling efficiency = (T_1 / T_N) / N. Each row also shows where a step's time
goes: the medians of its rollout, train, sync and colocate (turn-taking) seconds.

`--rounds N` runs the chosen placements N times, interleaved, in one process: an A/B whose
variants share the host's state (step times on one host moved by 0.3 s between calls).

GPU:  python bench/multi_gpu_step.py --steps 8 --out bench/results/multi_gpu_step.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from grpo_step import build_checkpoint, miles_recipe, write_prompts  # bench/ is on sys.path when run

APART = ["engine.backend=sglang", "engine.launch=true", "engine.server=miles", "sync.transport=nccl"]
COLOCATED = ["engine.backend=sglang", "engine.launch=true", "engine.server=miles", "engine.colocate=true",
             "engine.num_gpus=1", "sync.transport=cuda_ipc"]
RANKS = "--nproc-per-node"
"""Marks a placement run through the CLI with N trainer ranks (FSDP over NCCL): `RANKS N`."""
PLACEMENTS = {
    "1 GPU (engine in the trainer's process)": (1, []),
    "1 GPU (miles serve colocated: CUDA IPC sync, memory released while training)": (1, COLOCATED),
    "2 GPUs (FSDP, 2 trainer ranks; engine in rank 0's process), sync": (2, [f"{RANKS} 2", "train.backend=fsdp"]),
    "2 GPUs (engine on GPU 1, NCCL sync), sync": (2, [*APART, "engine.num_gpus=1"]),
    "2 GPUs (engine on GPU 1, NCCL sync), async": (2, [*APART, "engine.num_gpus=1", "loop.mode=async",
                                                       "algo.use_tis=true"]),
    "3 GPUs (2 engines on GPUs 1-2), async": (3, [*APART, "engine.num_gpus=2", "loop.mode=async",
                                                  "algo.use_tis=true"]),
    "1 GPU (engine in the trainer's process, colocated: memory released while training)": (1, ["engine.colocate=true"]),
    "1 GPU (miles serve colocated, weights copied to host memory while released)":
        (1, [*COLOCATED, "engine.weights_cpu_backup=true"]),
    "1 GPU (FSDP, 1 trainer rank; engine in its process)": (1, [f"{RANKS} 1", "train.backend=fsdp"]),
    "2 GPUs (FSDP, 2 trainer ranks, parameters gathered through the step), sync":
        (2, [f"{RANKS} 2", "train.backend=fsdp", "train.fsdp_reshard=step"]),
    "1 GPU (FSDP, 1 trainer rank, parameters gathered through the step)":
        (1, [f"{RANKS} 1", "train.backend=fsdp", "train.fsdp_reshard=step"]),
    "2 GPUs (FSDP, 2 trainer ranks gathered through the step, an engine on each rank), sync":
        (2, [f"{RANKS} 2", "train.backend=fsdp", "train.fsdp_reshard=step", "engine.ranks=all"]),
}


PARTS = ("rollout_time", "train_time", "sync_time", "colocate_time")
"""The parts of `perf/step_time` the report shows (medians over steps 2..N), where the time goes."""


def metric_rows(metrics_file: Path) -> list[dict]:
    """A run's `metrics.jsonl`, a dict a line."""
    return [json.loads(line) for line in metrics_file.read_text().splitlines()]


def step_parts(metrics_file: Path) -> str:
    """'rollout 1.10 + train 0.95 + ...' (seconds, medians over steps 2..N) from a run's metrics."""
    rows = metric_rows(metrics_file)[1:]
    parts = [(name.removesuffix("_time"), [row[f"perf/{name}"] for row in rows if f"perf/{name}" in row])
             for name in PARTS]
    return " + ".join(f"{name} {statistics.median(values):.2f}" for name, values in parts if values)


def run_placement(base: Path, work: Path, overrides: list[str]) -> list[float]:
    """Seconds per step as the trainer sees them (wall time between step records)."""
    ranks = [o for o in overrides if o.startswith(RANKS)]
    if ranks:
        return run_ranks(base, work, int(ranks[0].split()[1]), [o for o in overrides if o not in ranks])
    from miles_core.config import load_config
    from miles_core.rl.loop import run_training

    stamps = [time.perf_counter()]
    run_training(load_config(str(base), overrides), work,
                 on_step=lambda step, metrics: stamps.append(time.perf_counter()))
    gc.collect()  # the run's engine and trainer hold cycles: their memory goes before the next run
    torch.cuda.empty_cache()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run_ranks(base: Path, work: Path, ranks: int, overrides: list[str]) -> list[float]:
    """`miles train --nproc-per-node N` in a subprocess; seconds per step from its `perf/step_time`."""
    command = [sys.executable, "-m", "miles_cli.app", "train", "--recipe", str(base), "--output-dir", str(work),
               RANKS, str(ranks), *[arg for o in overrides for arg in ("--set", o)]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError((result.stdout + result.stderr).strip().splitlines()[-1])
    return [row["perf/step_time"] for row in metric_rows(work / "metrics.jsonl") if "perf/step_time" in row]


def report(args, rows: list[tuple[str, int, float | str, str]]) -> str:
    lines = ["# GRPO step on several GPUs (multi_gpu_step)", "",
             f"Card: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}; date: {datetime.date.today()}; "
             f"torch {torch.__version__}; command: `python {' '.join(sys.argv)}`. {args.prompts} prompts x 8 samples "
             f"x {args.new_tokens} new tokens a step, W1 model; median step time of steps 2..{args.steps}.", "",
             "| placement | GPUs | s/step | speed-up | scaling efficiency | parts of `perf/step_time`, s |",
             "|---|---|---|---|---|---|"]
    one = next((t for _, n, t, _ in rows if n == 1 and isinstance(t, float)), None)
    for label, gpus, seconds, parts in rows:
        if isinstance(seconds, str):
            lines.append(f"| {label} | {gpus} | {seconds} | | | |")
            continue
        # Speed-up and efficiency need a one-GPU placement in this run; blank without one.
        scaling = f"{one / seconds:.2f}x | {one / seconds / gpus:.0%}" if one else " | "
        lines.append(f"| {label} | {gpus} | {seconds:.3f} | {scaling} | {parts} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--tokenizer", default=".gpuassets/smollm2-tok")
    parser.add_argument("--placements", default="",
                        help="comma-separated indices into the placement list: " +
                             "; ".join(f"{i} = {label}" for i, label in enumerate(PLACEMENTS)))
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the chosen placements this many times, interleaved (an A/B in one process)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a config override for every placement (e.g. train.max_tokens_per_micro_batch=16384)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.device, args.pack, args.compile = "cuda", True, False
    chosen = [_placement(i) for i in args.placements.split(",")] if args.placements else list(PLACEMENTS)
    work = Path(tempfile.mkdtemp(prefix="multi_gpu_step_"))
    model = build_checkpoint(work / "model", Path(args.tokenizer), tiny=False)
    prompts = work / "prompts.jsonl"
    write_prompts(prompts, args.prompts * (args.steps + 2))
    base = work / "base.toml"
    base.write_text(miles_recipe(model, prompts, args).replace("batch_size = 8", f"batch_size = {args.prompts}")
                    .replace("max_batch_size = 64", f"max_batch_size = {args.prompts * 8}"))
    rows = []
    for number, label in enumerate(chosen * args.rounds):
        gpus, overrides = PLACEMENTS[label]
        if gpus > torch.cuda.device_count():
            continue
        name = _labelled(label, number, len(chosen), args.rounds)
        try:
            run = work / f"run{number}"
            times = run_placement(base, run, [*overrides, *args.overrides, f"loop.num_rollout={args.steps}"])
            rows.append((name, gpus, statistics.median(times[1:]), step_parts(run / "metrics.jsonl")))
        except Exception as err:  # noqa: BLE001 - one failing placement is reported, the rest still run
            rows.append((name, gpus, f"failed: {str(err).splitlines()[0][:200]}", ""))
        print(rows[-1], flush=True)
    text = report(args, rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def _placement(index: str) -> str:
    """The label of placement `index`, or a one-line exit naming the bad index."""
    if not index.strip().isdigit() or int(index) >= len(PLACEMENTS):
        raise SystemExit(f"--placements: '{index}' is not a placement index (0..{len(PLACEMENTS) - 1}; see --help)")
    return list(PLACEMENTS)[int(index)]


def _labelled(label: str, number: int, per_round: int, rounds: int) -> str:
    """The placement's label, with its round when there are several."""
    return f"{label}, round {number // per_round + 1}" if rounds > 1 else label


if __name__ == "__main__":
    main()
