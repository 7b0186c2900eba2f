"""`GenerateContext`: what a generate function receives besides its sample and sampling settings.

Token in, token out: `generate(input_ids, sampling)` sends exactly those ids to the engine and
returns the engine's `Generation` (output ids, their log-probs, finish reason); nothing is
re-tokenised. `observation_ids` turns environment or tool messages into the ids that follow a
model turn in the chat template's format, rendered on their own (see `delta_text`), so the ids
already generated are never rendered again, whatever the template does to earlier turns.

Seeds: sample j of prompt i gets `seed = sample_seed(first_seed + i, j)` and its turn t sends
request seed `seed + t`, so a sample's tokens do not depend on which other samples run beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from miles_core.agent.tools import ToolRunner
from miles_core.config import DataConfig, RolloutConfig, SamplingConfig
from miles_core.data import render_prompt
from miles_core.engine.aio import AsyncEngine
from miles_core.engine.protocol import GenerateRequest, Generation
from miles_core.errors import MilesError

Messages = list[dict[str, Any]]
_MARK = "MILES-TURN-MARK"
"""Assistant content of the stand-in conversation `delta_text` renders (found again by search)."""


@dataclass
class GenerateContext:
    """One sample's handle on the engine, the tokenizer and the configured tools."""

    engine: AsyncEngine
    tokenizer: Any
    data: DataConfig
    """How prompts are rendered (chat template, system prompt; `tools` among the template kwargs)."""
    rollout: RolloutConfig
    tools: ToolRunner | None
    seed: int
    rid: str
    max_context_len: int
    new_environment: Callable[[Any], Any] | None = None
    """`factory(sample) -> Environment` for the built-in multi-turn function (None: tool use)."""

    async def generate(self, input_ids: list[int], sampling: SamplingConfig, *, turn: int = 0) -> Generation:
        """One generation continuing exactly `input_ids` (n = 1; request id `<rid>-t<turn>`)."""
        request = GenerateRequest(input_ids=[int(i) for i in input_ids],
                                  sampling=replace(sampling, n_samples_per_prompt=1),
                                  seed=self.seed + turn, rid=f"{self.rid}-t{turn}")
        return (await self.engine.generate(request))[0]

    def abort(self, turn: int = 0) -> None:
        """Abort this sample's request of `turn` in the engine."""
        self.engine.abort(f"{self.rid}-t{turn}")

    def render(self, prompt: str | Messages) -> list[int]:
        """Prompt ids as the data config renders them (with the tools' schemas when set)."""
        return render_prompt(prompt, self.tokenizer, self.data)

    def observation_ids(self, observation: str | Messages, last_token: int) -> list[int]:
        """Ids that follow a model turn ending in `last_token`: the turn's closing text, the
        observation messages, and the next assistant header."""
        return [int(i) for i in self.tokenizer(self.delta_text(observation, last_token),
                                               add_special_tokens=False)["input_ids"]]

    def delta_text(self, observation: str | Messages, last_token: int) -> str:
        if isinstance(observation, str):
            observation = [{"role": "user", "content": observation}]
        if not self.data.apply_chat_template:
            return "\n" + "\n".join(m["content"] for m in observation) + "\n"
        return delta_text(self.tokenizer, observation, self.tokenizer.decode([last_token]),
                          self.data.chat_template_kwargs)


def delta_text(tokenizer, observation: Messages, last_text: str, kwargs: dict[str, Any]) -> str:
    """The chat template's text between a model turn's last generated token (`last_text`) and the
    next model turn: render a stand-in conversation with and without the observation and keep the
    difference, plus what the template closes an assistant turn with after the model's last token
    (`<|im_end|>` already generated -> only `\\n`). Refused when the observation changes how the
    stand-in renders (the template would rewrite history)."""
    base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}]
    before = tokenizer.apply_chat_template(base, tokenize=False, **kwargs)
    after = tokenizer.apply_chat_template(base + list(observation), tokenize=False, add_generation_prompt=True,
                                          **kwargs)
    if not after.startswith(before):
        raise MilesError("the chat template renders earlier messages differently once an observation or tool "
                         "message follows; multi-turn rollouts need a template that appends new messages")
    close = before[before.rindex(_MARK) + len(_MARK):]
    if last_text and close.startswith(last_text):  # the model generated the end-of-turn token itself
        close = close[len(last_text):]
    return close + after[len(before):]
