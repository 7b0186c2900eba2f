"""The built-in multi-turn generate function and its exact token accounting.

One sample is one conversation: the prompt ids, then model turns and observations (tool results,
environment messages) in the order they happened. `Trajectory` appends ids exactly as the engine
returned them (model turns: `loss_mask` 1, the engine's log-probs) or as the observation was
tokenised once (`loss_mask` 0, log-prob 0.0, never trained), so `Sample.tokens` is, token for
token, the last request's input ids followed by its output: what the model saw is what trains.

Each turn is the `action` of an environment (`environments.py`); the conversation ends when the
environment says done (for tool use: a turn without tool calls), a turn does not end by a stop
(length or abort), the context is full, or after `rollout.max_turns` model turns (then the sample
counts as truncated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from miles_core.agent.context import GenerateContext
from miles_core.agent.environments import ToolEnv, reset, step
from miles_core.config import SamplingConfig
from miles_core.engine.protocol import Generation
from miles_core.sample import Sample, Status

_STATUS = {"stop": Status.COMPLETED, "length": Status.TRUNCATED}


@dataclass
class Trajectory:
    """Prompt ids and every appended span, with masks, log-probs and a readable turn log."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)
    """Per span: role (`assistant` or `observation`), start and length in the response, text."""
    versions: list[str] = field(default_factory=list)
    """Weight version of each response token (`Sample.weight_versions`): a model token's sampling
    weights; an observation token carries the version of the turn before it (it is masked out)."""
    last: Generation | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def add_model_turn(self, gen: Generation) -> None:
        self._span("assistant", gen.output_ids, 1, gen.output_logprobs, gen.text)
        self.versions += [gen.weight_version] * len(gen.output_ids)
        self.last = gen

    def add_observation(self, ids: list[int], text: str) -> None:
        self._span("observation", ids, 0, [0.0] * len(ids), text)
        self.versions += [self.versions[-1] if self.versions else "0"] * len(ids)

    def _span(self, role: str, ids: list[int], mask: int, log_probs: list[float], text: str) -> None:
        self.turns.append({"role": role, "start": len(self.response_ids), "length": len(ids), "text": text})
        self.response_ids += list(ids)
        self.loss_mask += [mask] * len(ids)
        self.log_probs += list(log_probs)

    def to_sample(self, prompt: Sample, tokenizer, *, status: Status, extra: dict[str, Any]) -> Sample:
        finish = self.last.finish_reason if self.last else {"type": "abort", "message": "no model turn"}
        experts = self.last.routed_experts if self.last is not None else None
        if experts is not None and len(experts) != len(self.tokens) - 1:
            experts = None  # routing covers the last request only when it held the whole conversation
        return Sample(
            index=prompt.index, group_index=prompt.group_index, prompt=prompt.prompt, tokens=self.tokens,
            response=tokenizer.decode(self.response_ids), response_length=len(self.response_ids),
            label=prompt.label, loss_mask=self.loss_mask, status=status,
            metadata={**prompt.metadata, "finish_reason": finish, "turns": self.turns,
                      "num_turns": sum(t["role"] == "assistant" for t in self.turns), **extra},
            rollout_log_probs=self.log_probs, rollout_routed_experts=experts, weight_versions=self.versions)


async def multi_turn(ctx: GenerateContext, sample: Sample, sampling: SamplingConfig) -> Sample:
    """The built-in generate function: a conversation with tools or an environment."""
    env = ctx.new_environment(sample) if ctx.new_environment is not None else ToolEnv(ctx.tools)
    prompt = await reset(env)
    trajectory = Trajectory(ctx.render(prompt) if prompt is not None else list(sample.tokens))
    status, reward = Status.TRUNCATED, None
    for turn in range(ctx.rollout.max_turns):
        if len(trajectory.tokens) >= ctx.max_context_len:
            break  # no room for one more token: truncated
        gen = await ctx.generate(trajectory.tokens, sampling, turn=turn)
        trajectory.add_model_turn(gen)
        if gen.finish_reason["type"] != "stop":
            status = _STATUS.get(gen.finish_reason["type"], Status.ABORTED)
            break
        result = await step(env, gen.text)
        reward = result.reward if result.reward is not None else reward
        if result.done:
            status = Status.COMPLETED
            break
        if turn + 1 == ctx.rollout.max_turns:
            break  # truncated: the model would need another turn
        ids = ctx.observation_ids(result.observation or [], gen.output_ids[-1])  # None: the model speaks again
        if len(trajectory.tokens) + len(ids) >= ctx.max_context_len:
            break  # the observation leaves no room for the next turn: truncated
        trajectory.add_observation(ids, ctx.tokenizer.decode(ids))
    extra = {"tool_calls": env.num_calls, "tool_errors": env.num_errors} if isinstance(env, ToolEnv) else {}
    out = trajectory.to_sample(sample, ctx.tokenizer, status=status, extra=extra)
    out.reward = reward
    return out


def turn_spans(sample: Sample) -> list[dict[str, Any]]:
    """The response as displayed by `miles rollout --show`: one entry per span with its role,
    token count, loss mask and text (a single-turn sample is one trained span)."""
    turns = sample.metadata.get("turns")
    if not turns:
        return [{"role": "assistant", "length": sample.response_length, "trained": True, "text": sample.response}]
    mask = sample.loss_mask or [1] * sample.response_length
    return [{**t, "trained": bool(mask[t["start"]]) if t["length"] else t["role"] == "assistant"} for t in turns]
