"""Throughput of `miles serve` under concurrent clients, against the same engine in process.

Model (GPU default): Qwen3-0.6B-shaped (as bench/align_overhead.py), random weights, bf16, no eos
(every request decodes `--max-new-tokens`). `--tiny` uses the built-in tiny-qwen3 instead (the CPU
smoke test: `python bench/serve_throughput.py --device cpu --tiny`, a few seconds).
For each concurrency C: C clients on loopback each send `--requests-per-client` `POST /generate`
requests (random `--prompt-len`-token prompts, temperature 1, one request at a time per client);
the native engine batches continuously (requests join its running batch; at most
`--max-batch-size` sequences), other engines batch what arrives within `--batch-window-ms`. In process: the same requests through `engine.generate` in batches of
min(C, max-batch-size). Reported: requests/s, generated tokens/s, errors, batch sizes seen.

Run on a GPU machine:  python bench/serve_throughput.py [--concurrency 64,256] [--out results.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import time

import httpx
import torch

from miles_core.config import EngineConfig, ModelConfig, SamplingConfig
from miles_core.engine.native import NativeEngine
from miles_core.engine.protocol import GenerateRequest
from miles_core.serve import ServeOptions, ServerThread
from miles_core.serve.state import ModelFacts, ServeState
from miles_core.serve.worker import BatchingWorker

from align_overhead import QWEN3_0_6B, _NoText, random_model  # bench/ is on sys.path when run

def build_engine(args) -> tuple[NativeEngine, ModelFacts]:
    cfg = EngineConfig(max_batch_size=args.max_batch_size)
    if args.tiny:
        from miles_core.checkpoint.loading import load_model

        loaded = load_model(ModelConfig(source="tiny-qwen3", device=args.device))
        model, hf_config = loaded.model, loaded.hf_config
    else:
        model, hf_config = random_model(QWEN3_0_6B, args.device, torch.bfloat16), QWEN3_0_6B
    engine = NativeEngine(model, _NoText(), cfg, eos_token_ids=(), max_position_embeddings=4096)
    facts = ModelFacts(model_path="bench", max_context_len=4096, vocab_size=hf_config["vocab_size"], hf_config=hf_config)
    return engine, facts


def prompts(args, count: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(count)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def in_process(engine: NativeEngine, args, batch: list[list[int]], concurrency: int) -> dict:
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens)
    requests = [GenerateRequest(input_ids=p, sampling=sampling, seed=i) for i, p in enumerate(batch)]
    step = min(concurrency, args.max_batch_size)
    sync(args.device)
    start = time.perf_counter()
    tokens = sum(len(g[0].output_ids) for i in range(0, len(requests), step) for g in engine.generate(requests[i:i + step]))
    sync(args.device)
    return _figures(len(requests), tokens, time.perf_counter() - start, errors=0)


async def over_http(url: str, args, batch: list[list[int]], concurrency: int) -> dict:
    per_client = [batch[c::concurrency] for c in range(concurrency)]
    tokens, errors = [0], [0]

    async def client(http: httpx.AsyncClient, mine: list[list[int]], first_seed: int) -> None:
        for k, ids in enumerate(mine):
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                                                          "sampling_seed": first_seed + k}}
            answer = await http.post("/generate", json=body)
            if answer.status_code != 200:
                errors[0] += 1
                continue
            tokens[0] += answer.json()["meta_info"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, mine, 1000 * c) for c, mine in enumerate(per_client)))
        seconds = time.perf_counter() - start
    return _figures(len(batch), tokens[0], seconds, errors=errors[0])


def _figures(num_requests: int, tokens: int, seconds: float, *, errors: int) -> dict:
    return {"requests": num_requests, "tokens": tokens, "seconds": round(seconds, 3),
            "requests_per_s": round(num_requests / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "errors": errors}


def run(args) -> list[dict]:
    engine, facts = build_engine(args)
    options = ServeOptions(port=0, batch_window_ms=args.batch_window_ms)
    worker = BatchingWorker(engine, max_batch_size=args.max_batch_size, window_s=args.batch_window_ms / 1000)
    state = ServeState(engine, worker, _NoText(), options, facts)
    rows = []
    with ServerThread(state) as url:
        for concurrency in args.concurrency:
            batch = prompts(args, concurrency * args.requests_per_client, facts.vocab_size)
            in_process(engine, args, batch[:min(8, len(batch))], 8)  # warm-up
            local = in_process(engine, args, batch, concurrency)
            worker.stats.batch_sizes.clear()
            worker.stats.max_concurrent = 0
            http = asyncio.run(over_http(url, args, batch, concurrency))
            sizes = worker.stats.batch_sizes
            http["batching"] = (f"batches, median {statistics.median(sizes)}" if sizes else
                                f"continuous, up to {worker.stats.max_concurrent} in flight")
            rows.append({"concurrency": concurrency, "in_process": local, "serve": http})
    return rows


def report(args, rows: list[dict]) -> str:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    lines = [f"# serve_throughput ({datetime.date.today()}, {device}, {'tiny-qwen3' if args.tiny else 'Qwen3-0.6B shape bf16'})",
             f"prompt {args.prompt_len} tokens, {args.max_new_tokens} new, {args.requests_per_client} requests per client", "",
             "| clients | path | requests | req/s | tok/s | errors | engine batching |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        for path in ("in_process", "serve"):
            f = row[path]
            lines.append(f"| {row['concurrency']} | {path} | {f['requests']} | {f['requests_per_s']} | "
                         f"{f['tokens_per_s']} | {f['errors']} | {f.get('batching', '-')} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny-qwen3 and small sizes (CPU smoke test)")
    parser.add_argument("--concurrency", default=None, help="comma-separated client counts (default 64,256; tiny 8)")
    parser.add_argument("--requests-per-client", type=int, default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--out", default="", help="also write the table (markdown) and JSON rows here")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.concurrency = [int(c) for c in (args.concurrency or ("8" if tiny else "64,256")).split(",")]
    args.requests_per_client = args.requests_per_client or (2 if tiny else 4)
    args.prompt_len = args.prompt_len or (8 if tiny else 128)
    args.max_new_tokens = args.max_new_tokens or (4 if tiny else 128)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = run(args)
    table = report(args, rows)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n\n```json\n" + json.dumps(rows, indent=2) + "\n```\n")
    return rows


if __name__ == "__main__":
    main()
