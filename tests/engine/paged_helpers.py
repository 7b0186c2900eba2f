"""Shared pieces of the paged-engine tests: tiny models of every family, a text-free tokenizer,
random prompts, and runs of the paged engine next to the previous engine (`reference_engine`)."""

from __future__ import annotations

import torch

from miles_core.config import EngineConfig, SamplingConfig
from miles_core.engine.native import NativeEngine
from miles_core.engine.protocol import GenerateRequest
from miles_core.kernels import set_alignment_mode
from miles_core.models.tiny import TINY_DEEPSEEK_V3_CONFIG, TINY_QWEN3_CONFIG, TINY_QWEN3_MOE_CONFIG, tiny_model
from reference_engine import ReferenceEngine

TINY_LLAMA_CONFIG = {**TINY_QWEN3_CONFIG, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "attention_bias": False}
FAMILIES = {"llama": TINY_LLAMA_CONFIG, "qwen3": TINY_QWEN3_CONFIG, "qwen3-moe": TINY_QWEN3_MOE_CONFIG,
            "deepseek-v3": TINY_DEEPSEEK_V3_CONFIG}
# Forcing settings: a pool far smaller than the batch needs (preemption), a tiny token budget
# (chunked prefill), both; block_size 16 so short prompts span several blocks.
FORCED = {
    "plain": dict(block_size=16),
    "preempt": dict(block_size=16, num_kv_blocks=8),
    "chunked": dict(block_size=16, max_num_batched_tokens=7),
    "preempt+chunked": dict(block_size=16, num_kv_blocks=8, max_num_batched_tokens=20),
}


class ByteTokenizer:
    """Enough of a tokenizer for the engine: decode bytes < 256, skip the rest."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def model_for(family: str, mode: str = "invariant"):
    model = tiny_model(FAMILIES[family]).eval()
    set_alignment_mode(model, mode)
    return model


def prompts(count: int, seed: int = 0, low: int = 3, high: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=gen)
    return [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in lengths]


def requests(prompt_ids: list[list[int]], n: int = 2, **sampling) -> list[GenerateRequest]:
    sampling = {"temperature": 0.8, "max_new_tokens": 12, **sampling}
    cfg = SamplingConfig(n_samples_per_prompt=n, **sampling)
    return [GenerateRequest(input_ids=p, sampling=cfg, seed=i, rid=f"r{i}") for i, p in enumerate(prompt_ids)]


def paged(model, **cfg) -> NativeEngine:
    cfg = {"return_routed_experts": True, **cfg}
    return NativeEngine(model, ByteTokenizer(), EngineConfig(**cfg), eos_token_ids=(), max_position_embeddings=1024)


def reference(model, **cfg) -> ReferenceEngine:
    return ReferenceEngine(model, ByteTokenizer(), EngineConfig(return_routed_experts=True, **cfg),
                           eos_token_ids=(), max_position_embeddings=1024)


def run_with_abort(engine: NativeEngine, reqs: list[GenerateRequest], steps: int, rid: str) -> list:
    """Submit `reqs`, step `steps` times, abort request `rid`, step until idle; every request's
    generations."""
    handles = [engine.submit(r) for r in reqs]
    for _ in range(steps):
        engine.step()
    engine.abort(rid)
    while engine.step():
        pass
    return [h.result(timeout=0) for h in handles]


def flat(outputs):
    return [gen for group in outputs for gen in group]


def assert_no_leak(engine: NativeEngine) -> None:
    """Every block unowned: free, or cached and evictable."""
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(block.ref_count == 0 for block in engine.blocks.blocks)
    assert not engine.scheduler.has_work
