"""megatron-core backend on 2 GPUs (NCCL): TP=2 (dense Qwen3, also with sequence parallelism),
CP=2 and PP=2 (dense Qwen3), EP=2 and PP=2 (Qwen3-MoE), TP=2 with sequence parallelism (DeepSeek-V3's MLA)
against one rank.

For each layout, the same random model (seed 0, fp32 masters, bf16 compute) and the same batch run
on one rank (GPU 0) and on two ranks (GPUs 0-1, one process each, rank 0 leading as `miles train
--nproc-per-node 2` does): the log-probs of every response token, then one training step. Reported:
largest and mean absolute log-prob difference against one rank (goal: within bf16 rounding), the
gradient norms, and the seconds of the log-prob pass and of the step on each layout.

Shapes: Qwen3-0.6B's layer dims with 4 layers (dense), Qwen3-30B-A3B's (hidden 2048, 128 experts,
top 8, expert width 768, 32 heads, 4 KV heads) with 2 layers (MoE); vocabulary 151,936.

GPU (2 GPUs):  cd bench && python megatron_parallel.py --out results/megatron_parallel.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from miles_core.launch.local import free_port
from miles_core.train.batch import TrainBatch

COMMON = dict(vocab_size=151936, head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-6,
              rope_theta=1_000_000.0, tie_word_embeddings=False, hidden_act="silu")
LAYOUTS = {
    "qwen3 TP=2": (dict(COMMON, model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                        num_attention_heads=16, num_key_value_heads=8), {"tensor_model_parallel_size": 2}),
    "qwen3 TP=2 SP": (dict(COMMON, model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                           num_attention_heads=16, num_key_value_heads=8),
                      {"tensor_model_parallel_size": 2, "sequence_parallel": True}),
    "qwen3_moe EP=2": (dict(COMMON, model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                            num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4,
                            moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                            decoder_sparse_step=1, mlp_only_layers=[]), {"expert_model_parallel_size": 2}),
    "qwen3 CP=2": (dict(COMMON, model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                        num_attention_heads=16, num_key_value_heads=8), {"context_parallel_size": 2}),
    "qwen3 PP=2": (dict(COMMON, model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                        num_attention_heads=16, num_key_value_heads=8), {"pipeline_model_parallel_size": 2}),
    "qwen3_moe PP=2": (dict(COMMON, model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                            num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4,
                            moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                            decoder_sparse_step=1, mlp_only_layers=[]), {"pipeline_model_parallel_size": 2}),
    # DeepSeek-V3's MLA and expert dims (q/kv LoRA ranks 1536/512, 128 + 64 head dims, 2,048-wide
    # experts, 8 of 64 routed, one shared) at hidden 2048 and 16 heads, one dense and one MoE layer
    "deepseek_v3 TP=2 SP": (dict(COMMON, model_type="deepseek_v3", hidden_size=2048, intermediate_size=6144,
                              num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16,
                              moe_intermediate_size=2048, n_routed_experts=64, n_shared_experts=1,
                              num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                              norm_topk_prob=True, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
                              qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1,
                              num_nextn_predict_layers=0, scoring_func="sigmoid", topk_method="noaux_tc"),
                            {"tensor_model_parallel_size": 2, "sequence_parallel": True}),
}


def make_batch(vocab: int, num_seqs: int = 8, prompt: int = 256, response: int = 256) -> TrainBatch:
    gen = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, vocab, (prompt + response,), generator=gen) for _ in range(num_seqs)]
    return TrainBatch(tokens=tokens, response_lengths=[response] * num_seqs,
                      loss_masks=[torch.ones(response) for _ in range(num_seqs)],
                      advantages=[torch.full((response,), (-1.0) ** i) for i in range(num_seqs)])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


def _rank_main(rank: int, world: int, port: int, out: str, config: dict, parallel: dict) -> None:
    from dataclasses import replace

    sys.path.insert(0, str(Path(__file__).parent))
    from align_overhead import random_model
    from miles_core.config import AlgoConfig, TrainConfig
    from miles_core.train import build_trainer
    from miles_core.train.leader import follow, release_followers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=device if cuda else None)
    try:
        cfg = TrainConfig(backend="megatron", lr=1e-6, compute_dtype="bfloat16")
        trainer = build_trainer(replace(cfg, **parallel) if world > 1 else cfg, AlgoConfig(),
                                random_model(config, str(device)), temperature=1.0, total_steps=4)
        if rank != 0:
            follow(trainer, trainer.control_group)
            return
        batch = make_batch(config["vocab_size"])
        trainer.compute_log_probs(batch)  # warm-up
        logps, logp_s = _timed(lambda: trainer.compute_log_probs(batch))
        metrics, step_s = _timed(lambda: trainer.train_rollout(batch))
        if world > 1:
            release_followers()
        torch.save({"logps": [t.float().cpu() for t in logps], "grad_norm": metrics["grad_norm"],
                    "loss": metrics.get("loss"), "logp_s": logp_s, "step_s": step_s}, out)
    finally:
        dist.destroy_process_group()


def run(config: dict, parallel: dict, world: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "result.pt")
        mp.spawn(_rank_main, args=(world, free_port(), out, config, parallel), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def compare(name: str, one: dict, two: dict) -> str:
    diffs = torch.cat([(a - b).abs() for a, b in zip(one["logps"], two["logps"])])
    return (f"| {name} | {diffs.max().item():.2e} | {diffs.mean().item():.2e} | {one['grad_norm']:.5f} | "
            f"{two['grad_norm']:.5f} | {abs(one['grad_norm'] - two['grad_norm']) / one['grad_norm']:.2%} | "
            f"{one['logp_s']:.3f} / {two['logp_s']:.3f} | {one['step_s']:.3f} / {two['step_s']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of: {', '.join(LAYOUTS)}")
    parser.add_argument("--tiny", action="store_true", help="small widths (a CPU smoke run of the script)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = []
    for name in args.layouts.split(","):
        config, parallel = LAYOUTS[name]
        if args.tiny:
            config = dict(config, vocab_size=512, hidden_size=64, intermediate_size=128, head_dim=16,
                          num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=32, num_experts=8,
                          num_experts_per_tok=2)
            if config["model_type"] == "deepseek_v3":
                config.update(num_key_value_heads=4, n_routed_experts=8, n_group=2, topk_group=1, kv_lora_rank=32,
                              q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        try:
            rows.append(compare(name, run(config, parallel, 1), run(config, parallel, 2)))
        except Exception as err:  # noqa: BLE001 - one failing layout is reported, the other still runs
            rows.append(f"| {name} | failed: {str(err).splitlines()[-1][:200]} | | | | | | |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# megatron-core backend: two ranks against one (megatron_parallel)", "",
        f"Card: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'} x {torch.cuda.device_count()}; date: {datetime.date.today()}; "
        f"torch {torch.__version__}; command: `python {' '.join(sys.argv)}`. bf16 compute, fp32 masters, "
        "8 sequences of 256 + 256 tokens, one AdamW step.", "",
        "| layout | max abs log-prob diff | mean abs diff | grad norm, 1 rank | grad norm, 2 ranks | grad norm diff | "
        "log-prob pass s (1 / 2 ranks) | step s (1 / 2 ranks) |", "|---|---|---|---|---|---|---|---|", *rows, ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
