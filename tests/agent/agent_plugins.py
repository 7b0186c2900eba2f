"""Plugins the agent tests load by dotted path (the test folder is put on sys.path), and a
scripted `RolloutEngine` whose answers are fixed texts, so tool calls happen on cue."""

from __future__ import annotations

import asyncio
import threading

from miles_core.engine.protocol import Generation
from miles_core.sample import Sample

class ScriptedEngine:
    """Answers the k-th request of a conversation (k = its turn, from the rid `...-t<k>`) with
    `script[k]` plus the eos token; log-probs -0.01 * (position + 1)."""

    def __init__(self, tokenizer, script: list[str], max_context_len: int = 4096) -> None:
        self.tokenizer, self.script, self.max_context_len = tokenizer, script, max_context_len
        self.weight_version = "0"
        self.requests = []
        self._lock = threading.Lock()

    def generate(self, requests, on_progress=None):
        out = []
        for request in requests:
            with self._lock:
                self.requests.append(request)
            turn = int(request.rid.rpartition("-t")[2])
            text = self.script[min(turn, len(self.script) - 1)]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append([Generation(output_ids=ids, output_logprobs=[-0.01 * (k + 1) for k in range(len(ids))],
                                   finish_reason={"type": "stop", "matched": ids[-1]}, text=text,
                                   prompt_tokens=len(request.input_ids), weight_version="0")])
        return out


async def stuck(ctx, sample, sampling):
    """A generate function that never finishes."""
    await asyncio.Event().wait()


async def one_turn(ctx, sample, sampling):
    """Token in, token out: one engine call, the response trained."""
    gen = await ctx.generate(sample.tokens, sampling)
    return Sample(prompt=sample.prompt, tokens=sample.tokens + gen.output_ids, response_length=len(gen.output_ids),
                  label=sample.label, rollout_log_probs=gen.output_logprobs, loss_mask=[1] * len(gen.output_ids),
                  metadata={"finish_reason": gen.finish_reason})


async def two_rows(ctx, sample, sampling):
    first = await one_turn(ctx, sample, sampling)
    return [first, first]


async def stuck_in_engine(ctx, sample, sampling):
    """Prompt 0 answers at once; the others wait on an engine request that never runs (the test
    pauses the engine) and must be aborted by the timeout."""
    if sample.group_index == 0:
        return Sample(prompt=sample.prompt, tokens=sample.tokens + [5], response_length=1, reward=1.0)
    await ctx.generate(sample.tokens, sampling)


async def returns_none(ctx, sample, sampling):
    return None


async def bad_mask(ctx, sample, sampling):
    return Sample(tokens=[1, 2, 3], response_length=2, loss_mask=[1])


async def raises(ctx, sample, sampling):
    raise RuntimeError("boom")


def not_async(ctx, sample, sampling):
    return sample


async def two_args(ctx, sample):
    return sample


class CountdownEnv:
    """Always continues with an observation until the rollout's turn limit; reward = turns seen."""

    def __init__(self, sample):
        self.turns = 0

    def reset(self):
        return None

    def step(self, action):
        self.turns += 1
        return f"observation {self.turns}", float(self.turns), False


def countdown_env(sample):
    return CountdownEnv(sample)
