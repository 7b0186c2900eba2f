"""The generate-function seam: samples made by `async fn(ctx, sample, sampling)` instead of one
engine call (slime's `--custom-generate-function-path`).

`rollout.generate_function` names the function (`package.module:function`); empty with tools or
an environment configured, it is the built-in multi-turn one (`agent/multiturn.py`). The function
is called once per sample (n per prompt) with a `GenerateContext` (token-in/token-out generate
and abort on the engine, the tokenizer, the tools), the prompt as a `Sample` whose `tokens` are
the rendered prompt ids, and the `SamplingConfig`. All calls of a batch run concurrently on one
event loop, so the engine batches their requests.

Contract, checked: an `async def` taking three positional arguments, returning a `Sample` or a
non-empty list of them; each with token ids, `1 <= response_length < len(tokens)` and, when set,
`loss_mask` and `rollout_log_probs` of `response_length` entries. A list is several training rows
for one call (every row keeps the prompt's group); training needs `n_samples_per_prompt` rows
per prompt. An exception in the function stops the step with one line naming it.

Timeouts: a sample still running after `rollout.sample_timeout_s`, or when the whole batch has
taken `rollout.step_timeout_s`, is cancelled (its engine requests aborted) and replaced by an
aborted sample: reward 0, one masked-out token, so it trains nothing and its group keeps its size.
The counts appear as `rollout/aborted_samples` and `rollout/timeouts`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from miles_core.agent.context import GenerateContext
from miles_core.agent.environments import environment_factory
from miles_core.agent.multiturn import multi_turn
from miles_core.agent.tools import ToolRunner, resolve_tools
from miles_core.algo.hooks import resolve_hook
from miles_core.config import DataConfig, RolloutConfig, SamplingConfig
from miles_core.engine.aio import AsyncEngine
from miles_core.engine.native import sample_seed
from miles_core.engine.protocol import RolloutEngine
from miles_core.errors import MilesError
from miles_core.sample import Sample, Status

BUILT_IN = "miles_core.agent.multiturn:multi_turn"


def load_generate_function(path: str) -> Callable[..., Any]:
    """A dotted path -> the async generate function, contract-checked (bad path, not async,
    wrong arity: one MilesError line)."""
    fn = resolve_hook(path, "generate")
    if not inspect.iscoroutinefunction(fn):
        raise MilesError(f"generate function (rollout.generate_function) '{path}' must be an async function "
                         f"(async def fn(ctx, sample, sampling)), got {type(fn).__name__} {fn!r:.60}")
    return fn


@dataclass
class AgentRollout:
    """The resolved generate function, tools and environment of a `RolloutConfig`."""

    cfg: RolloutConfig
    fn: Callable[..., Any]
    name: str
    tools: ToolRunner | None
    new_environment: Callable[[Sample], Any] | None

    @classmethod
    def from_config(cls, cfg: RolloutConfig) -> AgentRollout:
        """Everything resolved now, so a bad path fails before any model is loaded."""
        tools = ToolRunner(resolve_tools(cfg.tools.names), cfg.tools) if cfg.tools.names else None
        factory = environment_factory(cfg.environment) if cfg.environment else None
        name = cfg.generate_function or BUILT_IN
        fn = load_generate_function(cfg.generate_function) if cfg.generate_function else multi_turn
        return cls(cfg, fn, name, tools, factory)

    def prompt_data(self, data: DataConfig) -> DataConfig:
        """The data config prompts are rendered with: the tools' schemas go to the chat template."""
        if self.tools is None or not data.apply_chat_template:
            return data
        return replace(data, chat_template_kwargs={**data.chat_template_kwargs, "tools": self.tools.schemas})

    def generate(self, engine: RolloutEngine, tokenizer, data: DataConfig, sampling: SamplingConfig,
                 prompts: Sequence[Sample], prompt_ids: Sequence[list[int]], *, first_seed: int,
                 on_progress: Callable[[int], None] | None = None) -> list[list[Sample]]:
        """One group per prompt: n calls each, all concurrent; rows in call order."""
        aio = AsyncEngine(engine)
        jobs = []
        for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
            for j in range(sampling.n_samples_per_prompt):
                ctx = GenerateContext(aio, tokenizer, data, self.cfg, self.tools, seed=sample_seed(first_seed + i, j),
                                      rid=f"prompt-{prompt.index}-s{j}", max_context_len=engine.max_context_len,
                                      new_environment=self.new_environment)
                sample = Sample(index=len(jobs), group_index=i, prompt=prompt.prompt, tokens=list(ids),
                                label=prompt.label, metadata=dict(prompt.metadata))
                jobs.append((ctx, sample))
        with aio.running():
            rows = asyncio.run(self._run_all(jobs, sampling, tokenizer, on_progress))
        for row in rows:
            if isinstance(row, MilesError):
                raise row
        groups: list[list[Sample]] = [[] for _ in prompts]
        for (_, sample), samples in zip(jobs, rows):
            groups[sample.group_index] += samples
        return groups

    async def _run_all(self, jobs, sampling, tokenizer, on_progress) -> list[list[Sample]]:
        tasks = [asyncio.create_task(self._one(ctx, sample, sampling, tokenizer, on_progress)) for ctx, sample in jobs]
        _, pending = await asyncio.wait(tasks, timeout=self.cfg.step_timeout_s or None)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return [[aborted(sample, tokenizer, "step_timeout")] if task in pending else task.result()
                for task, (_, sample) in zip(tasks, jobs)]  # raises only on a bug of miles itself

    async def _one(self, ctx: GenerateContext, sample: Sample, sampling: SamplingConfig, tokenizer,
                   on_progress) -> list[Sample] | MilesError:
        """The call's rows, or the error that stops the step (returned, raised once the loop ends)."""
        prompt = replace(sample, metadata=dict(sample.metadata), tokens=list(sample.tokens))  # theirs to change
        try:
            result = await asyncio.wait_for(self.fn(ctx, prompt, sampling), self.cfg.sample_timeout_s or None)
        except asyncio.TimeoutError:
            result = aborted(sample, tokenizer, "sample_timeout")
        except MilesError as err:
            return err
        except Exception as err:  # noqa: BLE001 - a user function's bug, reported as one line
            return MilesError(f"generate function '{self.name}' raised {type(err).__name__}: {err} "
                              f"(prompt {sample.group_index}, sample {ctx.rid})")
        if on_progress:
            on_progress(1)
        try:
            return checked(result, self.name, sample.group_index)
        except MilesError as err:
            return err


def checked(result: Any, name: str, group_index: int) -> list[Sample]:
    """The function's result as rows, or one MilesError line saying what is wrong with it."""
    rows = result if isinstance(result, list) else [result]
    if not rows or not all(isinstance(s, Sample) for s in rows):
        raise MilesError(f"generate function '{name}' must return a Sample or a non-empty list of Samples, "
                         f"got {type(result).__name__} {result!r:.60}")
    for row in rows:
        problem = sample_problem(row)
        if problem:
            raise MilesError(f"generate function '{name}' returned a bad Sample: {problem}")
        row.group_index = group_index
        if row.status == Status.PENDING:
            row.status = Status.COMPLETED
        kind = {Status.TRUNCATED: "length", Status.ABORTED: "abort", Status.FAILED: "abort"}.get(row.status, "stop")
        row.metadata.setdefault("finish_reason", {"type": kind})  # summaries count finish reasons
    return rows


def sample_problem(sample: Sample) -> str:
    """Why `sample` cannot train ("" when it can)."""
    tokens, length = sample.tokens, sample.response_length
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
        return f"tokens must be a non-empty list of ints, got {tokens!r:.60}"
    if not isinstance(length, int) or not 1 <= length < len(tokens):
        return f"response_length must be in [1, len(tokens) - 1 = {len(tokens) - 1}], got {length!r}"
    for key in ("loss_mask", "rollout_log_probs"):
        values = getattr(sample, key)
        if values is not None and len(values) != length:
            return f"{key} has {len(values)} entries, expected response_length = {length}"
    if sample.loss_mask is not None and any(m not in (0, 1) for m in sample.loss_mask):
        return "loss_mask entries must be 0 or 1"
    return ""


def aborted(prompt: Sample, tokenizer, reason: str) -> Sample:
    """Stand-in for a sample that ran out of time: reward 0, one token that is never trained."""
    pad = getattr(tokenizer, "eos_token_id", None)
    pad = pad if isinstance(pad, int) else prompt.tokens[-1]
    return Sample(index=prompt.index, group_index=prompt.group_index, prompt=prompt.prompt,
                  tokens=list(prompt.tokens) + [pad], response_length=1, label=prompt.label, reward=0.0,
                  loss_mask=[0], rollout_log_probs=[0.0], status=Status.ABORTED,
                  metadata={**prompt.metadata, "abort_reason": reason,
                            "finish_reason": {"type": "abort", "message": reason}})


def check_group_sizes(groups: list[list[Sample]], n: int) -> None:
    """Training groups must hold `n_samples_per_prompt` rows (group advantages assume it)."""
    sizes = sorted({len(g) for g in groups})
    if sizes != [n]:
        raise MilesError(f"the generate function gave groups of {sizes} rows; training needs "
                         f"sampling.n_samples_per_prompt = {n} rows per prompt (one Sample per call)")


def agent_metrics(samples: Sequence[Sample]) -> dict[str, float]:
    """`rollout/*` of agentic samples: turns, tool calls and errors per sample, aborted counts."""
    count = max(len(samples), 1)

    def per_sample(key: str) -> float:
        return sum(float(s.metadata.get(key, 0)) for s in samples) / count

    return {"rollout/num_turns": per_sample("num_turns"), "rollout/tool_calls": per_sample("tool_calls"),
            "rollout/tool_errors": per_sample("tool_errors"),
            "rollout/aborted_samples": float(sum(s.status == Status.ABORTED for s in samples)),
            "rollout/timeouts": float(sum("abort_reason" in s.metadata for s in samples))}
