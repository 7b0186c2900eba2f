"""Tool calls and tools: the Hermes parser, the calculator, the runner's error messages, its
timeout, and the subprocess sandbox's memory and time limits. No case raises: every failure is
the text of a tool message."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from miles_core.agent.calculator import calculator
from miles_core.agent.tool_calls import ToolCall, parse_tool_calls
from miles_core.agent.tools import ToolRunner, resolve_tools
from miles_core.config import ToolsConfig
from miles_core.errors import MilesError


@pytest.fixture(autouse=True)
def plugins_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def test_parse_hermes_tool_calls():
    text = ('Let me compute. <tool_call>\n{"name": "calculator", "arguments": {"expression": "12+34"}}\n</tool_call>'
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    assert parse_tool_calls(text) == [ToolCall("calculator", {"expression": "12+34"}), ToolCall("add", {"a": 1, "b": 2})]
    assert parse_tool_calls("The answer is 46.") == []


@pytest.mark.parametrize("body, error", [
    ("{bad json}", "not valid JSON"),
    ('{"arguments": {}}', 'must be a JSON object {"name"'),
    ('["calculator"]', 'must be a JSON object {"name"'),
    ('{"name": "calculator", "arguments": [1]}', "arguments of 'calculator' must be a JSON object"),
    ('{"name": "calculator", "arguments": "{oops"}', "arguments of 'calculator' are not a JSON object"),
])
def test_malformed_tool_calls_become_errors(body, error):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert error in call.error


def test_unclosed_tool_call_is_an_error():
    (call,) = parse_tool_calls('<tool_call>{"name": "calculator"')
    assert call.error == "the tool call is not closed with </tool_call>"


@pytest.mark.parametrize("expression, value", [("12 + 34", "46"), ("(2 + 3) * 4 - 6 / 3", "18"), ("7 / 2", "3.5"),
                                               ("2 ** 10", "1024"), ("-5 + 17 % 5", "-3"), ("99 + 99 + 99", "297")])
def test_calculator(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, error", [("__import__('os')", "unsupported expression element: Call"),
                                               ("a + 1", "unsupported expression element: Name"),
                                               ("2 ** 100", "exponent larger than 64"), ("1 +", "not an arithmetic")])
def test_calculator_refuses_code_and_huge_numbers(expression, error):
    with pytest.raises(ValueError, match=error.replace("(", r"\(")):
        calculator(expression)


def _run(runner: ToolRunner, text: str) -> list[str]:
    return [asyncio.run(runner.run(call)) for call in parse_tool_calls(text)]


def call(name: str, **arguments) -> str:
    import json
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


@pytest.mark.parametrize("sandbox", ["none", "subprocess"])
def test_runner_answers_and_turns_failures_into_messages(sandbox):
    runner = ToolRunner(resolve_tools(["calculator", "agent_tools:add"]), ToolsConfig(sandbox=sandbox))
    assert _run(runner, call("calculator", expression="12+34*2")) == ["80"]
    assert _run(runner, call("add", a=2, b=40)) == ["42"]
    assert _run(runner, call("calculator", expression="1/0")) == ["error: ZeroDivisionError: division by zero"]
    assert _run(runner, call("search", q="x")) == ["error: unknown tool 'search'; available: add, calculator"]
    assert _run(runner, call("add", a=1)) == ["error: bad arguments for 'add': missing a required argument: 'b'"]
    assert _run(runner, "<tool_call>{1}</tool_call>")[0].startswith("error: the tool call is not valid JSON")


def test_schemas_for_the_chat_template():
    (add,) = resolve_tools(["agent_tools:add"])
    assert add.schema == {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}}


def test_a_stuck_tool_times_out_in_process():
    runner = ToolRunner(resolve_tools(["agent_tools:stuck_tool"]), ToolsConfig(timeout_s=0.2))
    assert _run(runner, call("stuck_tool")) == ["error: tool 'stuck_tool' timed out after 0.2 s"]


def test_sandbox_kills_a_spinning_tool_at_the_timeout():
    runner = ToolRunner(resolve_tools(["agent_tools:spin"]), ToolsConfig(timeout_s=1.0, sandbox="subprocess"))
    assert _run(runner, call("spin")) == ["error: tool 'spin' timed out after 1 s"]


def test_sandbox_memory_limit():
    runner = ToolRunner(resolve_tools(["agent_tools:hog_memory"]), ToolsConfig(sandbox="subprocess", memory_mb=200))
    assert _run(runner, call("hog_memory", megabytes=1)) == [str(1 << 20)]
    assert _run(runner, call("hog_memory", megabytes=400)) == ["error: MemoryError: "]


def test_bad_tool_names_fail_at_start():
    with pytest.raises(MilesError, match="unknown tool 'calc' in rollout.tools.names; expected one of: calculator"):
        resolve_tools(["calc"])
    with pytest.raises(MilesError, match="cannot import module 'no_such_module_xyz'"):
        resolve_tools(["no_such_module_xyz:f"])

    def local(x: str) -> str:
        return x

    from miles_core.agent.tools import Tool
    with pytest.raises(MilesError, match="cannot be imported there"):
        ToolRunner([Tool("local", local, f"{local.__module__}:{local.__qualname__}")], ToolsConfig(sandbox="subprocess"))


def test_sandbox_cpu_limit_kills_a_spinning_tool_without_a_timeout():
    runner = ToolRunner(resolve_tools(["agent_tools:spin"]), ToolsConfig(timeout_s=0, sandbox="subprocess", cpu_s=1))
    assert _run(runner, call("spin")) == ["error: the tool process failed (killed by SIGXCPU)"]
