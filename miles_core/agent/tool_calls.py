"""Tool calls in a model turn: the Qwen/Hermes format, parsed without ever raising.

A call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5/Qwen3 and Hermes
chat templates; `arguments` may also be a JSON string). Every way a call can be malformed (bad
JSON, no name, arguments that are not an object, an unclosed tag) becomes a `ToolCall` with an
`error`, which the caller answers with an error tool message: a model that writes a broken call
learns from the answer, and a rollout never crashes on it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    """Why the call cannot run (bad JSON, no name, ...); empty for a well-formed call."""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>` block of `text`, in order (an unclosed last block counts, and is an error)."""
    calls = []
    for match in _CALL.finditer(text):
        closed = match.group(0).endswith(CLOSE)
        calls.append(_parse_one(match.group(1).strip()) if closed else
                     ToolCall("", error=f"the tool call is not closed with {CLOSE}"))
    return calls


def _parse_one(body: str) -> ToolCall:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        return ToolCall("", error=f"the tool call is not valid JSON ({err.msg} at char {err.pos}): {body[:80]!r}")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return ToolCall("", error='the tool call must be a JSON object {"name": ..., "arguments": {...}}')
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return ToolCall(data["name"], error=f"the arguments of '{data['name']}' are not a JSON object")
    if not isinstance(arguments, dict):
        return ToolCall(data["name"], error=f"the arguments of '{data['name']}' must be a JSON object")
    return ToolCall(data["name"], arguments)
