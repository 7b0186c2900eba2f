"""Step time and reward curves of sync, async and async + partial rollout training, in one run.

Workload (defaults; every knob is a flag): the W1 model of `grpo_step.py` (Qwen3 at 0.6B shape,
SmolLM2 tokenizer, random init, bf16) on prompts of about `--prompt-tokens` tokens (lists of
two-digit additions), 16 prompts x 8 samples a step, temperature 1, one optimizer step per
rollout, lr 1e-5, TIS on in every mode (the same algorithm everywhere). Long prompts make the
training side heavy while generation stays short, so the two take similar time. Response
lengths have a long tail: `--stop-ids` token ids end a response (a random model hits one with
probability about stop_ids / vocab a token: a geometric length, mean ~64 tokens) and
`--new-tokens` caps it (a few samples a step reach the cap; the step waits for them). Reward:
the share of response tokens whose id is a multiple of 8 (0.125 for the untrained model; a
dense signal any model can learn, so reward curves can be compared).

Modes: `sync` (generate, then train); `async` (loop.max_staleness 1: step s+1 is generated while
step s trains); `async+partial` (also rollout.partial with `--over-sampling` groups in flight for
16, unfinished ones aborted and continued next step, old prefixes masked). Every mode trains on
the same number of samples a step, so step index = samples seen.

Step time: wall time between consecutive step records (the trainer's side: waiting for the
rollout, training, publishing weights), median of steps 3..N (the pipeline fills at step 0). A
one-step sync run first warms the process up (CUDA context, allocator, kernel choices) and is not
reported.

GPU (the SmolLM2 tokenizer must be cached, or pass --tokenizer DIR):
    python bench/async_step.py --steps 12 --out bench/results/async_step.md
`--set KEY=VALUE` overrides the recipe in every mode, e.g. to put the engine on a GPU of its own
(a `miles serve` process on the next GPU, weights over NCCL) so generation and training overlap
on different devices.
CPU smoke test (seconds; tiny model, byte tokenizer; numbers mean nothing):
    python bench/async_step.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from grpo_step import build_checkpoint

# As the CLI does (miles_cli/app.py): OpenMP threads that spin while idle would take the cores
# from the other thread of an async run on CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

MODES = {
    "sync": [],
    "async": ["loop.mode=async", "loop.max_staleness=1"],
    "async+partial": ["loop.mode=async", "loop.max_staleness=1", "rollout.partial=true",
                      "rollout.mask_offpolicy_prefix=true"],
}


def target_share(sample) -> float:
    """The benchmark's reward: the share of response tokens whose id is a multiple of 8."""
    tokens = sample.response_tokens
    return sum(t % 8 == 0 for t in tokens) / max(len(tokens), 1)


def write_prompts(path: Path, count: int, prompt_tokens: int) -> None:
    """`count` prompts, each a list of two-digit additions of about `prompt_tokens` tokens."""
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        sums = ", ".join(f"{rng.randint(10, 99)} + {rng.randint(10, 99)}" for _ in range(max(prompt_tokens // 6, 1)))
        rows.append({"prompt": f"Add up each pair and answer with the results: {sums}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def recipe(model_dir: Path, prompts: Path, args) -> str:
    stops = list(range(1000, 1000 + args.stop_ids))
    return f"""
[model]
source = "{model_dir}"
dtype = "{args.dtype}"
device = "{args.device}"
[engine]
max_batch_size = {args.batch_size * 8 * 2}
max_context_len = {args.prompt_tokens * 2 + args.new_tokens + 64}
mem_fraction = {args.mem_fraction}
[data]
path = "{prompts}"
input_key = "prompt"
label_key = ""
apply_chat_template = true
shuffle = false
[sampling]
temperature = 1.0
max_new_tokens = {args.new_tokens}
n_samples_per_prompt = {args.samples}
stop_token_ids = {stops}
[rollout]
batch_size = {args.batch_size}
[reward]
type = "async_step:target_share"
[algo]
use_tis = true
over_sampling_batch_size = {args.over_sampling}
[train]
lr = {args.lr}
compute_dtype = "{args.dtype}"
max_tokens_per_micro_batch = {args.micro_batch_tokens}
[loop]
num_rollout = {args.steps}
"""


def run_mode(name: str, base: Path, work: Path, *extra: str) -> dict:
    """Train one mode; per-step wall times, rewards, and the sync-side stage times."""
    from miles_core.config import load_config
    from miles_core.rl.loop import run_training

    stamps = [time.perf_counter()]

    def on_step(step: int, metrics: dict) -> None:  # a line a step: a slow or stuck run shows where it is
        stamps.append(time.perf_counter())
        print(f"{name} step {step}: {stamps[-1] - stamps[-2]:.3f} s (rollout {metrics.get('perf/rollout_time', 0):.3f}, "
              f"train {metrics.get('perf/train_time', 0):.3f}, sync {metrics.get('perf/sync_time', 0):.3f}, "
              f"reward {metrics.get('rollout/raw_reward', float('nan')):.4f})", flush=True)

    result = run_training(load_config(str(base), [*MODES[name], *extra]), work / f"{name}{len(extra)}",
                          on_step=on_step)
    _free()
    history = result.history
    return {"step_s": [b - a for a, b in zip(stamps, stamps[1:])],
            "reward": [r["rollout/raw_reward"] for r in history],
            "rollout_s": [r.get("perf/rollout_time", 0.0) for r in history],
            "train_s": [r.get("perf/train_time", 0.0) for r in history],
            "resp_len": [r["rollout/response_len"] for r in history],
            "staleness": [r.get("rollout/staleness_mean", 0.0) for r in history]}


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median_from(values: list[float], first: int) -> float:
    return statistics.median(values[first:] if len(values) > first else values)


def report(args, runs: dict[str, dict]) -> str:
    import torch

    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    first = 2 if args.steps > 3 else 0
    sync = median_from(runs["sync"]["step_s"], first)
    lines = ["# Async training step time (async_step)", "",
             f"Card: {card}; date: {datetime.date.today()}; torch {torch.__version__}; command: "
             f"`python {' '.join(sys.argv)}`. Median of steps {first + 1}..{args.steps}; one process, modes in turn.",
             "", "| mode | step s | speed-up vs sync | rollout s | train s | mean staleness | mean reward, last half |",
             "|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        step = median_from(run["step_s"], first)
        half = run["reward"][len(run["reward"]) // 2:]
        lines.append(f"| {name} | {step:.3f} | {sync / step:.2f}x | {median_from(run['rollout_s'], first):.3f} | "
                     f"{median_from(run['train_s'], first):.3f} | {statistics.mean(run['staleness']):.2f} | "
                     f"{statistics.mean(half):.4f} |")
    lines += ["", "`rollout s` is the trainer's wait for the step's samples (async: what generation did not hide).",
              "", "Reward by step (every mode trains the same number of samples a step):", "",
              "| step | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for step in range(args.steps):
        lines.append(f"| {step} | " + " | ".join(f"{run['reward'][step]:.4f}" for run in runs.values()) + " |")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts a step")
    parser.add_argument("--samples", type=int, default=8, help="samples a prompt")
    parser.add_argument("--over-sampling", type=int, default=24, help="groups in flight (partial mode)")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--stop-ids", type=int, default=768, help="token ids that end a response (the tail)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--mem-fraction", type=float, default=0.25,
                        help="engine.mem_fraction: the KV pool's share of free GPU memory (the trainer needs the rest)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU, 3 steps: a smoke test")
    parser.add_argument("--tokenizer", default="", help="folder with the SmolLM2 tokenizer (default: the cache)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every mode (repeatable), e.g. engine placement: "
                             "--set engine.launch=true --set engine.server=miles --set engine.num_gpus=1")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.quick:
        args.device, args.dtype, args.steps, args.batch_size, args.samples = "cpu", "float32", 3, 4, 2
        args.over_sampling, args.prompt_tokens, args.new_tokens, args.stop_ids = 6, 24, 16, 40
        args.micro_batch_tokens = 1024
    return args


def main() -> None:
    args = parse_args()
    from miles_core.checkpoint.sources import resolve_model_source

    work = Path(tempfile.mkdtemp(prefix="async_step_"))
    try:
        tokenizer = Path(args.tokenizer) if args.tokenizer else \
            resolve_model_source("tiny-qwen3" if args.quick else "smollm2-135m")
        model_dir = build_checkpoint(work / "model", tokenizer, args.quick)
        prompts = work / "prompts.jsonl"
        write_prompts(prompts, max(args.over_sampling, args.batch_size) * (args.steps + 2), args.prompt_tokens)
        base = work / "base.toml"
        base.write_text(recipe(model_dir, prompts, args))
        run_mode("sync", base, work, *args.overrides, "loop.num_rollout=1")  # warm-up, not reported
        runs = {name: run_mode(name, base, work, *args.overrides) for name in args.modes.split(",")}
        text = report(args, runs)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
