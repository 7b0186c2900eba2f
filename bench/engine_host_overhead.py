"""Host (CPU, Python) time of one native-engine decode step, with the model's work taken out.

On a GPU a decode step of a small model replays a CUDA graph; the host meanwhile schedules the
step, stages the graph's inputs, launches the sampler and records the sampled tokens. Whatever
of that is not hidden behind the GPU's work is time in which the GPU idles. This bench measures
it on any machine: the engine runs a tiny model (hidden 32, 1 layer) on CPU with the decode
graphs replaced by `HostOnlyGraphs`, which stages every input exactly as on the GPU
(`DecodeGraphs.run`) but replays nothing and returns fixed logits. What remains is the host's
work per step, split by phase:

- schedule: `Scheduler.schedule` (decode rows, block reservation)
- stage: `ModelRunner.forward` (block tables, slots, positions, the packed host-to-device copy)
- computed: `Scheduler.computed` (token counts, prefix-cache registration)
- sampler: `sample_tokens` (temperature, log-softmax, inverse-CDF draw; on a GPU its launches)
- record: the rest of `NativeEngine._launch_sample` and `_record_pending` (uniform draws,
  sampling tensors, token and logprob appends, stop checks, retiring finished sequences)
- other: the rest of `NativeEngine.step` (inbox, locks, fork bookkeeping)

On CPU the sampler's time is CPU math on a `--vocab`-wide row (on a GPU it is launches only);
the vocabulary is small so that it stays close to its launch cost. With `--device cuda` the same
run measures a GPU host: staging goes through pinned memory and the sampler is launched on the
GPU, and each step waits for its tokens as the engine does (the GPU's own work is tiny).

CPU:  python bench/engine_host_overhead.py --batches 64,256 --steps 64 --out bench/results/engine_host_overhead.md
GPU host:  python bench/engine_host_overhead.py --device cuda
      (add --profile for cProfile's top functions of the timed decode steps)
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import platform
import pstats
import statistics
import sys
import time

import torch

from align_overhead import emit_report  # bench/ is on sys.path when run
from miles_core.config import EngineConfig, SamplingConfig
from miles_core.engine.native import NativeEngine
from miles_core.engine.native import engine as engine_module
from miles_core.engine.native.cuda_graphs import DecodeGraphs
from miles_core.engine.protocol import GenerateRequest
from miles_core.kernels import model_ops, set_alignment_mode
from miles_core.models.tiny import TINY_QWEN3_CONFIG, tiny_model

PHASES = ("schedule", "stage", "computed", "sampler", "record", "other")


class _NoText:
    """The engine decodes each finished output once; the bench needs no text."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


class _NoReplay:
    def replay(self) -> None:
        pass


class HostOnlyGraphs(DecodeGraphs):
    """`DecodeGraphs` whose replay does no work: inputs are staged as on the GPU, logits are fixed."""

    def _capture(self) -> None:
        self._ops = model_ops(self.model)
        vocab = self.model.lm_head.weight.shape[0]
        logits = torch.randn(self.sizes[-1], vocab, generator=torch.Generator().manual_seed(0)).to(self.ids_G1.device)
        self.graphs = {size: _NoReplay() for size in self.sizes}
        self.logits = {size: logits[:size] for size in self.sizes}


class _Timer:
    """Seconds spent in wrapped callables, per phase (only while `on`)."""

    def __init__(self) -> None:
        self.on = False
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
        return timed


def build_engine(batch: int, args, timer: _Timer) -> NativeEngine:
    config = {**TINY_QWEN3_CONFIG, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": args.vocab}
    model = tiny_model(config).to(args.device).eval()
    set_alignment_mode(model, args.mode)
    # The graphs' block tables have a column per block of the longest context (max_context_len).
    # The plain step order: each phase is timed where it runs (`engine.overlap` moves the record
    # of a step into the next one; the host work per step is the same).
    cfg = EngineConfig(max_batch_size=batch, block_size=64, cuda_graphs=False, max_context_len=args.max_context_len,
                       overlap="off")
    engine = NativeEngine(model, _NoText(), cfg, eos_token_ids=(), max_position_embeddings=args.max_context_len)
    engine.runner.graphs = HostOnlyGraphs(model, engine.pool, max_batch_size=batch,
                                          max_blocks_per_row=engine.blocks.blocks_for(engine.max_context_len))
    engine.scheduler.schedule = timer.wrap("schedule", engine.scheduler.schedule)
    engine.runner.forward = timer.wrap("stage", engine.runner.forward)
    engine.scheduler.computed = timer.wrap("computed", engine.scheduler.computed)
    engine._launch_sample = timer.wrap("record", engine._launch_sample)  # sampler launch inside: subtracted
    engine._record_pending = timer.wrap("record", engine._record_pending)
    return engine


def run_batch(batch: int, args) -> dict:
    timer = _Timer()
    real_sample_tokens = engine_module.sample_tokens
    engine_module.sample_tokens = timer.wrap("sampler", real_sample_tokens)
    try:
        engine = build_engine(batch, args, timer)
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, args.vocab, (16,), generator=gen).tolist() for _ in range(batch)]

        def submit(new_tokens: int) -> None:
            sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)
            for i, p in enumerate(prompts):
                engine.submit(GenerateRequest(input_ids=p, sampling=sampling, seed=i, rid=f"r{i}"))

        submit(4)  # warm-up
        while engine.step():
            pass
        submit(args.steps + 1)
        engine.step()  # the prefill step (samples the first token): not timed
        profiler = cProfile.Profile() if args.profile else None
        durations = []
        timer.on = True
        if profiler:
            profiler.enable()
        while True:  # the last call finds no work; its time (answering requests) counts too
            start = time.perf_counter()
            busy = engine.step()
            durations.append(time.perf_counter() - start)
            if not busy:
                break
        if profiler:
            profiler.disable()
        timer.on = False
    finally:
        engine_module.sample_tokens = real_sample_tokens
    steps = args.steps
    assert len(durations) == steps + 1, (len(durations), steps)
    us = {phase: 1e6 * s / steps for phase, s in timer.seconds.items()}
    us["record"] -= us["sampler"]  # sample_tokens runs inside _launch_sample
    total = 1e6 * sum(durations) / steps
    us["other"] = total - sum(us[p] for p in PHASES if p != "other")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return dict(batch=batch, total=total, median=1e6 * statistics.median(durations[:-1]), **us)


def report(rows: list[dict], args) -> str:
    card = f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    lines = [f"machine: {platform.machine()} CPU{card}, {torch.get_num_threads()} torch threads; date: "
             f"{datetime.date.today()}; torch {torch.__version__}; mode {args.mode}; vocab {args.vocab}; "
             f"max_context_len {args.max_context_len}; "
             f"command: `python {' '.join(sys.argv)}`", "",
             "| batch | step us (mean) | step us (median) | " + " | ".join(PHASES) + " |",
             "|---" * (3 + len(PHASES)) + "|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['total']:,.0f} | {r['median']:,.0f} | "
                     + " | ".join(f"{r[p]:,.0f}" for p in PHASES) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per batch")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--mode", default="fast", choices=["fast", "invariant"])
    parser.add_argument("--max-context-len", type=int, default=4096,
                        help="engine.max_context_len (sets the graphs' block-table width)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch; the fastest is shown")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    parser.add_argument("--out", default="", help="also write the table to this file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the sampler's CPU math does not fight other processes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        runs = [run_batch(batch, args) for _ in range(args.repeats)]
        rows.append(min(runs, key=lambda r: r["total"]))
    emit_report(report(rows, args) + "\n", args.out)


if __name__ == "__main__":
    main()
