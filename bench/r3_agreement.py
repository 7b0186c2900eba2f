"""Routing agreement and log-prob gap with and without Rollout Routing Replay (R3), on CPU.

For the tiny MoE built-ins (Qwen3-MoE; DeepSeek-V3 with MLA), the engine generates 16 prompts x 2
samples x 8 tokens and records its routing. Three trainers rescore the same tokens:
  same:      the engine's own weights (fast kernels)
  perturbed: router weights + N(0, sigma) noise, a stand-in for the numeric drift between an
             inference engine and a trainer (different kernels, dtypes, parallelism)
  perturbed + R3: the same, replaying the engine's routing.
Reports the routing agreement (the trainer routers' own choice vs the engine's) and the
log-prob gap. Run:  python bench/r3_agreement.py [--sigma 0.02]
"""

from __future__ import annotations

import argparse
import copy

import torch

from miles_core.config import AlgoConfig, EngineConfig, ModelConfig, SamplingConfig, TrainConfig
from miles_core.engine.native import NativeEngine
from miles_core.engine.protocol import GenerateRequest
from miles_core.algo.mismatch import MismatchSums
from miles_core.checkpoint.loading import load_model
from miles_core.sample import Sample
from miles_core.train.batch import TrainBatch
from miles_core.train.native import NativeTrainer


def rollout(loaded) -> list[Sample]:
    engine = NativeEngine(loaded.model, loaded.tokenizer, EngineConfig(return_routed_experts=True),
                          eos_token_ids=(), max_position_embeddings=1024)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in torch.randint(3, 30, (16,), generator=gen)]
    outs = engine.generate([GenerateRequest(input_ids=p, sampling=SamplingConfig(max_new_tokens=8, n_samples_per_prompt=2),
                                            seed=i) for i, p in enumerate(prompts)])
    return [Sample(tokens=p + o.output_ids, response_length=len(o.output_ids), rollout_log_probs=o.output_logprobs,
                   rollout_routed_experts=o.routed_experts) for p, group in zip(prompts, outs) for o in group]


def measure(model, samples, replay: str) -> tuple[float, dict]:
    trainer = NativeTrainer(copy.deepcopy(model), TrainConfig(routing_replay=replay), AlgoConfig(),
                            temperature=1.0, total_steps=1)
    batch = TrainBatch.from_samples(samples, [torch.zeros(s.response_length) for s in samples])
    sums = MismatchSums()
    for logp, s in zip(trainer.compute_log_probs(batch), samples):
        sums.add(logp, torch.tensor(s.rollout_log_probs))
    return trainer.last_pass_metrics()["routing_agreement"], sums.metrics()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sigma", type=float, default=0.02)
    args = parser.parse_args()
    print("| model | trainer | routing agreement | mean abs logprob diff | max abs logprob diff |")
    print("|---|---|---|---|---|")
    for source in ("tiny-qwen3-moe", "tiny-deepseek-v3"):
        loaded = load_model(ModelConfig(source=source, device="cpu"))
        samples = rollout(loaded)
        perturbed = copy.deepcopy(loaded.model)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in perturbed.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.add_(torch.randn(p.shape, generator=gen) * args.sigma)
        for label, model, replay in (("same weights", loaded.model, "off"), ("perturbed", perturbed, "off"),
                                     ("perturbed + R3", perturbed, "rollout")):
            agreement, stats = measure(model, samples, replay)
            print(f"| {source} | {label} | {agreement:.2%} | {stats['mean_abs_diff']:.2e} | {stats['max_abs_diff']:.2e} |")


if __name__ == "__main__":
    main()
