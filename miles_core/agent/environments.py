"""Environments for interactive tasks: `reset() -> prompt`, `step(action) -> (observation, reward, done)`.

The built-in multi-turn rollout drives an environment: `reset()` gives the prompt (text or chat
messages; None keeps the sample's own prompt), each model turn's text is the `action`, and
`step` answers with an observation (text, which becomes a user message, or a list of chat
messages), a reward (None leaves scoring to the reward function) and whether the episode is done.
Either method may be a coroutine function.

`ToolEnv` is the environment of plain tool use: each `<tool_call>` of a turn runs through the
`ToolRunner` and its answer comes back as a tool message; a turn without tool calls is the answer.
`rollout.environment` names a factory `package.module:factory(sample) -> Environment`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from miles_core.agent.tool_calls import parse_tool_calls
from miles_core.agent.tools import ToolRunner
from miles_core.algo.hooks import import_callable
from miles_core.errors import MilesError
from miles_core.sample import Sample


@dataclass
class StepResult:
    observation: str | list[dict[str, Any]] | None
    reward: float | dict[str, Any] | None = None
    done: bool = False


class Environment(Protocol):
    def reset(self) -> str | list[dict[str, Any]] | None: ...

    def step(self, action: str) -> tuple[Any, float | dict | None, bool] | StepResult: ...


class ToolEnv:
    """Tool use: run the turn's tool calls and answer with tool messages; no call ends the episode."""

    def __init__(self, runner: ToolRunner) -> None:
        self.runner = runner
        self.num_calls = self.num_errors = 0

    def reset(self) -> None:
        return None  # the sample's own prompt, rendered with the tools' schemas

    async def step(self, action: str) -> StepResult:
        calls = parse_tool_calls(action)
        if not calls:
            return StepResult(None, done=True)
        messages = []
        for index, call in enumerate(calls):
            over = index >= self.runner.cfg.max_calls_per_turn
            content = (f"error: at most {self.runner.cfg.max_calls_per_turn} tool calls per turn" if over
                       else await self.runner.run(call))
            self.num_calls += 1
            self.num_errors += content.startswith("error: ")
            messages.append({"role": "tool", "name": call.name, "content": content})
        return StepResult(messages)


async def reset(env: Environment) -> Any:
    return await _maybe_await(env.reset())


async def step(env: Environment, action: str) -> StepResult:
    """`env.step(action)` as a `StepResult` (sync or async, tuple or record), checked."""
    result = await _maybe_await(env.step(action))
    if isinstance(result, StepResult):
        return result
    if not isinstance(result, tuple) or len(result) != 3:
        raise MilesError(f"environment {type(env).__name__}.step must return (observation, reward, done), "
                         f"got {type(result).__name__} {result!r:.80}")
    return StepResult(*result)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def environment_factory(path: str) -> Callable[[Sample], Environment]:
    """`rollout.environment` -> a factory, checked for taking the prompt sample."""
    factory = import_callable(path, "environment (rollout.environment)")
    try:
        inspect.signature(factory).bind(None)
    except TypeError:
        raise MilesError(f"environment (rollout.environment) '{path}' must take one argument (the prompt "
                         f"Sample), but its signature is {inspect.signature(factory)}") from None
    except ValueError:
        pass  # no introspectable signature: the call will tell
    return factory
