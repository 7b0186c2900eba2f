"""Multi-turn tool use with exact token accounting, on a scripted engine (fixed answers, so the
tool calls happen on cue): the sample's ids are the engine's last input plus its output, token
for token; tool tokens have loss_mask 0 and log-prob 0; a template that rewrites earlier turns
(not append-only) does not change what trains."""

from __future__ import annotations

import copy
import json

import pytest

from miles_core.checkpoint.loading import load_model
from miles_core.config import DataConfig, ModelConfig, RewardConfig, RolloutConfig, SamplingConfig, ToolsConfig
from miles_core.rl.manager import RolloutManager
from miles_core.sample import Sample, Status
from miles_core.train.batch import TrainBatch

from agent_plugins import ScriptedEngine

THINKING_TEMPLATE = (  # drops the reasoning of every assistant turn but the last, as Qwen3's template does
    "{% for m in messages %}{% set content = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("MILES_CACHE", str(tmp_path_factory.mktemp("cache")))
    loaded = load_model(ModelConfig(source="tiny-qwen3", device="cpu"))
    patch.undo()
    return loaded.tokenizer


def call(expression: str) -> str:
    return f'<tool_call>{json.dumps({"name": "calculator", "arguments": {"expression": expression}})}</tool_call>'


def rollout(tokenizer, script: list[str], *, max_turns: int = 4, prompt="What is 12 + 34?") -> tuple[Sample, ScriptedEngine]:
    engine = ScriptedEngine(tokenizer, script)
    manager = RolloutManager(engine, tokenizer, data=DataConfig(), sampling=SamplingConfig(max_new_tokens=64),
                             reward=RewardConfig(type="last_number"),
                             rollout=RolloutConfig(max_turns=max_turns, tools=ToolsConfig(names=("calculator",))))
    (group,) = manager.generate_all([Sample(prompt=prompt, label="46")])
    manager.score(group)
    return group[0], engine


def spans(engine: ScriptedEngine, tokenizer) -> list[tuple[list[int], int]]:
    """(ids, mask) of every span of the conversation, rebuilt from the engine's requests."""
    out, eos = [], tokenizer.eos_token_id
    for request, following in zip(engine.requests, engine.requests[1:]):
        model = tokenizer(engine.script[len(out) // 2], add_special_tokens=False)["input_ids"] + [eos]
        start = len(request.input_ids) + len(model)
        assert following.input_ids[:start] == request.input_ids + model  # ids only ever appended
        out += [(model, 1), (following.input_ids[start:], 0)]
    return out


def test_tool_call_then_answer(tokenizer):
    sample, engine = rollout(tokenizer, [call("12+34"), "The answer is 46."])
    first, second = engine.requests
    answer = tokenizer("The answer is 46.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert sample.tokens == second.input_ids + answer  # what trains is what the engine saw and wrote
    assert sample.prompt_length == len(first.input_ids)
    (model, _), (tool, _) = spans(engine, tokenizer)
    assert tokenizer.decode(tool) == "\n<|im_start|>tool\n46<|im_end|>\n<|im_start|>assistant\n"
    assert sample.loss_mask == [1] * len(model) + [0] * len(tool) + [1] * len(answer)
    assert sample.rollout_log_probs == ([-0.01 * (k + 1) for k in range(len(model))] + [0.0] * len(tool)
                                        + [-0.01 * (k + 1) for k in range(len(answer))])
    assert sample.status == Status.COMPLETED and sample.reward == 1.0
    assert (sample.metadata["num_turns"], sample.metadata["tool_calls"], sample.metadata["tool_errors"]) == (2, 1, 0)
    assert [t["role"] for t in sample.metadata["turns"]] == ["assistant", "observation", "assistant"]
    assert len(sample.weight_versions) == sample.response_length  # one version per response token


def test_tool_errors_are_tool_messages_and_max_turns_truncates(tokenizer):
    sample, engine = rollout(tokenizer, ["<tool_call>{not json}</tool_call>", call("1/0"), call("2+2")], max_turns=3)
    assert len(engine.requests) == 3
    observations = [tokenizer.decode(ids) for ids, mask in spans(engine, tokenizer) if mask == 0]
    assert "error: the tool call is not valid JSON" in observations[0]
    assert "error: ZeroDivisionError: division by zero" in observations[1]
    assert sample.status == Status.TRUNCATED  # the third turn still called a tool
    assert (sample.metadata["tool_calls"], sample.metadata["tool_errors"]) == (3, 2)  # every action is stepped
    assert sample.tokens[-len(sample.loss_mask):] == sample.response_tokens
    assert sample.loss_mask[-1] == 1  # no observation after the last turn


def test_template_that_is_not_append_only_trains_the_generated_tokens(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = THINKING_TEMPLATE
    script = ["<think>use the tool</think>" + call("12+34"), "<think>double it</think>" + call("46*2"),
              "<think>done</think>The answer is 92."]
    sample, engine = rollout(tok, script)
    assert len(engine.requests) == 3 and sample.metadata["num_turns"] == 3
    last = engine.requests[-1]
    final = tok(script[-1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    generated = last.input_ids + final
    assert sample.tokens == generated
    assert TrainBatch.from_samples([sample]).tokens[0].tolist() == generated  # the trained sequence
    # Rendering the finished conversation again would drop the first two turns' reasoning: other ids.
    messages = [{"role": "user", "content": "What is 12 + 34?"}, {"role": "assistant", "content": script[0]},
                {"role": "tool", "content": "46"}, {"role": "assistant", "content": script[1]},
                {"role": "tool", "content": "92"}, {"role": "assistant", "content": script[2]}]
    rerendered = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert "use the tool" not in tok.decode(rerendered) and "use the tool" in tok.decode(sample.tokens)
    assert rerendered != generated[:len(rerendered)]
    masks = [mask for ids, mask in spans(engine, tok) for _ in ids] + [1] * len(final)
    assert sample.loss_mask == masks


def test_template_that_rewrites_history_on_an_observation_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = THINKING_TEMPLATE.replace("split('</think>')[-1]", "lower()")
    from miles_core.errors import MilesError
    with pytest.raises(MilesError, match="renders earlier messages differently"):
        rollout(tok, [call("1+1"), "2"])
