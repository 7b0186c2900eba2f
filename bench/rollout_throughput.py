"""Rollout throughput: the native engine against `transformers.generate`, same weights, same card.

Models: Qwen3-0.6B and Qwen3-4B shapes (bench/train_throughput.py's SHAPES), random bf16 weights,
no eos (every sequence decodes all its new tokens), temperature 1. Workloads: `--prompts` random
128-token prompts (one sample each) x `--new-tokens`. The native engine runs each workload once
after a warm-up of 4 tokens at the same batch (CUDA-graph capture happens when the engine is
built, and fast mode compiles its fused kernels on the first prefill: neither is timed; the prefix
cache is flushed after it, so the timed prompts are prefilled whole) in `fast` mode,
and at the 0.6B shape also in `invariant` mode. `transformers.generate` (sampling, SDPA, dynamic
cache) runs the same prompts with at most `--peer-new-tokens` new tokens: its per-token cost
grows with the context, so a shorter generation favours it and the speed-up shown is a lower
bound where its tokens are fewer (the table says how many it ran).

Bandwidth bound: a decode step must read every weight once and each row's keys and values; with
B rows at mean context C (prompt + half the new tokens) that is W + B * C * kv_bytes_per_token
bytes per B tokens. Bound = B / (bytes / bw), bw = the card's measured device-to-device copy
bandwidth (read + write bytes over time). The fraction reached is engine tok/s over the bound.

GPU:  python bench/rollout_throughput.py --out bench/results/rollout_throughput.md
CPU smoke test (seconds):  python bench/rollout_throughput.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time

import torch

from miles_core.config import EngineConfig, SamplingConfig
from miles_core.engine.native import NativeEngine
from miles_core.engine.protocol import GenerateRequest
from miles_core.kernels import set_alignment_mode

from align_overhead import _NoText, emit_report, random_model  # bench/ is on sys.path when run
from train_throughput import SHAPES


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    if device != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (time.perf_counter() - start)


def bound_tokens_per_s(shape: dict, weight_bytes: int, batch: int, prompt_len: int, new_tokens: int, bw: float) -> float:
    kv_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * 2  # bf16 k+v
    mean_context = prompt_len + new_tokens / 2
    step_bytes = weight_bytes + batch * mean_context * kv_per_token
    return batch / (step_bytes / bw)


def random_prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def native_tokens_per_s(model, mode: str, prompts: list[list[int]], new_tokens: int, args) -> float:
    set_alignment_mode(model, mode)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the pool is sized from free memory: give back the peer's cached blocks
    engine = NativeEngine(model, _NoText(), EngineConfig(max_batch_size=len(prompts), mem_fraction=args.mem_fraction,
                                                         cuda_graphs=not args.no_graphs),
                          eos_token_ids=(), max_position_embeddings=4096)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)
    # Warm-up at the workload's shapes: fast mode compiles its fused kernels for the prefill
    # shapes on first use (decode graphs were captured when the engine was built).
    engine.generate([GenerateRequest(input_ids=p, sampling=SamplingConfig(temperature=1.0, max_new_tokens=4), seed=i)
                     for i, p in enumerate(prompts)])
    # The timed run prefills its prompts whole, as the warm-up did and as fresh RL prompts are
    # (and as `transformers` does): with the warm-up's blocks still cached it would take a
    # cached-prefix prefill path the warm-up never ran, and pay its first-use costs in the timing.
    engine.flush_cache()
    requests = [GenerateRequest(input_ids=p, sampling=sampling, seed=i) for i, p in enumerate(prompts)]
    sync(args.device)
    start = time.perf_counter()
    outputs = engine.generate(requests)
    sync(args.device)
    seconds = time.perf_counter() - start
    assert all(len(group[0].output_ids) == new_tokens for group in outputs)
    return len(prompts) * new_tokens / seconds


def hf_model(native, shape: dict, device: str):
    import transformers

    config = transformers.Qwen3Config(**{k: v for k, v in shape.items() if k != "model_type"})
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(native.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model.eval()


def hf_tokens_per_s(model, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    model.generate(ids[:2], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    sync(device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def measure(args, name: str, bw: float) -> list[dict]:
    shape = SHAPES[name]
    native = random_model(shape, args.device, torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in native.parameters())
    peer = hf_model(native, shape, args.device) if not args.no_peer else None
    rows = []
    for batch in args.batches:
        prompts = random_prompts(batch, args.prompt_len, shape["vocab_size"])
        peer_tokens = min(args.peer_new_tokens, max(args.new_tokens))
        hf = hf_tokens_per_s(peer, prompts, peer_tokens, args.device) if peer is not None else float("nan")
        print(name, batch, "transformers", peer_tokens, f"{hf:,.0f}", flush=True)
        for new_tokens in args.new_tokens:
            modes = ["fast", "invariant"] if name in args.invariant_shapes else ["fast"]
            for mode in modes:
                tps = native_tokens_per_s(native, mode, prompts, new_tokens, args)
                bound = bound_tokens_per_s(shape, weight_bytes, batch, args.prompt_len, new_tokens, bw)
                rows.append(dict(shape=name, batch=batch, new=new_tokens, mode=mode, tps=tps, hf=hf,
                                 hf_new=peer_tokens, bound=bound))
                print(rows[-1], flush=True)
                gc.collect()
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def report(args, rows: list[dict], bw: float) -> str:
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = ["# Rollout throughput (rollout_throughput)", "",
             f"Card: {card}; date: {datetime.date.today()}; torch {torch.__version__}; "
             f"command: `python {' '.join(sys.argv)}`.",
             f"{args.prompt_len}-token random prompts, one sample each, no eos, temperature 1; measured copy "
             f"bandwidth {bw / 1e12:.2f} TB/s; CUDA graphs {'off' if args.no_graphs else 'on'}.", "",
             "| shape | batch | new tokens | mode | engine tok/s | transformers tok/s (its new tokens) "
             "| speed-up | bandwidth bound tok/s | fraction of bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['new']} | {r['mode']} | {r['tps']:,.0f} | "
                     f"{r['hf']:,.0f} ({r['hf_new']}) | {r['tps'] / r['hf']:.1f}x | {r['bound']:,.0f} | "
                     f"{r['tps'] / r['bound']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="0.6B,4B")
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--new-tokens", default="256,1024")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--peer-new-tokens", type=int, default=256)
    parser.add_argument("--invariant-shapes", default="0.6B")
    parser.add_argument("--mem-fraction", type=float, default=0.85)
    parser.add_argument("--no-graphs", action="store_true", help="engine without CUDA graphs")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers.generate")
    parser.add_argument("--tiny", action="store_true", help="tiny shape, 4 prompts x 8 tokens (smoke test)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.batches, args.new_tokens, args.prompt_len, args.invariant_shapes = "tiny", "4", "8", 16, "tiny"
    args.batches = [int(b) for b in args.batches.split(",")]
    args.new_tokens = [int(n) for n in args.new_tokens.split(",")]
    bw = copy_bandwidth(args.device)
    rows = [row for name in args.shapes.split(",") for row in measure(args, name, bw)]
    text = report(args, rows, bw)
    emit_report(text, args.out)


if __name__ == "__main__":
    main()
