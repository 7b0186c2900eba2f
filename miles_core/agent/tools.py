"""Python tools a model may call: registry, JSON schemas for the chat template, and the runner.

A tool is a plain function with keyword arguments that returns text (or JSON-able data); its
schema (OpenAI function format, what chat templates take as `tools`) comes from its signature and
docstring. `rollout.tools.names` picks built-in tools (`TOOLS`) or `package.module:function` paths.

`ToolRunner.run(call)` never raises: an unknown tool, bad arguments, an exception, a timeout or a
crash of the sandbox process all come back as `error: ...` text, which the rollout appends as the
tool message. Without a sandbox a call runs in a worker thread: a timeout answers at once, but a
thread cannot be killed, so a tool that may hang for ever belongs in the `subprocess` sandbox,
where each call is a fresh Python process with address-space and CPU-time limits, killed at the
timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from miles_core.agent.calculator import calculator
from miles_core.agent.tool_calls import ToolCall
from miles_core.algo.hooks import import_callable
from miles_core.config import ToolsConfig
from miles_core.engine.aio import in_thread
from miles_core.errors import MilesError

TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator}
"""Built-in tools by name."""
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
_SANDBOX_MAIN = """
import importlib, json, sys
request = json.loads(sys.stdin.read())
try:
    module, _, name = request["path"].partition(":")
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    result = fn(**request["arguments"])
    print(json.dumps({"result": result if isinstance(result, str) else json.dumps(result)}))
except Exception as err:
    print(json.dumps({"error": f"{type(err).__name__}: {err}"}))
"""


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    path: str
    """`module:qualname`, how the sandbox process imports it."""

    @property
    def schema(self) -> dict[str, Any]:
        """The OpenAI function schema chat templates render (`tools=[...]`)."""
        params, required = {}, []
        for name, param in inspect.signature(self.fn).parameters.items():
            params[name] = {"type": _json_type(param.annotation)}
            if param.default is inspect.Parameter.empty:
                required.append(name)
        description = (inspect.getdoc(self.fn) or self.name).splitlines()[0]
        return {"type": "function", "function": {"name": self.name, "description": description,
                                                 "parameters": {"type": "object", "properties": params,
                                                                "required": required}}}


def _json_type(annotation: Any) -> str:
    """JSON schema type of a parameter annotation (a type, or its name under postponed annotations)."""
    by_name = {kind.__name__: json for kind, json in _JSON_TYPES.items()}
    return _JSON_TYPES.get(annotation) or by_name.get(str(annotation), "string")


def resolve_tools(names: Sequence[str]) -> list[Tool]:
    """Built-in names or dotted paths -> tools (a bad name fails here, before any rollout)."""
    tools = []
    for name in names:
        if name in TOOLS:
            fn = TOOLS[name]
        elif ":" in name or "." in name:
            fn = import_callable(name, "tool (rollout.tools.names)")
        else:
            raise MilesError(f"unknown tool '{name}' in rollout.tools.names; expected one of: "
                             f"{', '.join(sorted(TOOLS))}, or a 'package.module:function' path")
        tools.append(Tool(getattr(fn, "__name__", name.rpartition(":")[2]), fn,
                          f"{fn.__module__}:{fn.__qualname__}"))
    seen = [t.name for t in tools]
    if len(set(seen)) != len(seen):
        raise MilesError(f"rollout.tools.names gives two tools the same name: {seen}")
    return tools


class ToolRunner:
    """Runs tool calls with the `[rollout.tools]` timeout and sandbox; answers are always text."""

    def __init__(self, tools: Sequence[Tool], cfg: ToolsConfig) -> None:
        self.tools, self.cfg = {t.name: t for t in tools}, cfg
        if cfg.sandbox == "subprocess":
            local = [t.path for t in tools if "<locals>" in t.path or t.path.startswith("__main__:")]
            if local:
                raise MilesError(f"rollout.tools.sandbox = 'subprocess' imports each tool in a new process; "
                                 f"{local[0]} cannot be imported there (define it at module level in a module)")

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tools.values()]

    async def run(self, call: ToolCall) -> str:
        """The tool message content for `call`: the tool's answer, or `error: ...`."""
        problem = call.error or self._argument_problem(call)
        if problem:
            return f"error: {problem}"
        tool = self.tools[call.name]
        timeout = self.cfg.timeout_s or None
        try:
            if self.cfg.sandbox == "subprocess":
                return await _run_sandboxed(tool, call.arguments, self.cfg, timeout)
            result = await asyncio.wait_for(in_thread(tool.fn, **call.arguments), timeout)
        except asyncio.TimeoutError:
            return f"error: tool '{call.name}' timed out after {self.cfg.timeout_s:g} s"
        except Exception as err:  # noqa: BLE001 - any tool failure is the model's feedback
            return f"error: {type(err).__name__}: {err}"
        return result if isinstance(result, str) else json.dumps(result)

    def _argument_problem(self, call: ToolCall) -> str:
        if call.name not in self.tools:
            return f"unknown tool '{call.name}'; available: {', '.join(sorted(self.tools))}"
        try:
            inspect.signature(self.tools[call.name].fn).bind(**call.arguments)
        except TypeError as err:
            return f"bad arguments for '{call.name}': {err}"
        return ""


async def _run_sandboxed(tool: Tool, arguments: dict[str, Any], cfg: ToolsConfig, timeout: float | None) -> str:
    """One call in a fresh Python process with resource limits; killed at the timeout."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SANDBOX_MAIN, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=lambda: _limit(cfg.memory_mb, cfg.cpu_s),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),  # imports as here
             "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})  # BLAS buffers fit the memory limit
    request = json.dumps({"path": tool.path, "arguments": arguments}).encode()
    try:
        out, err = await asyncio.wait_for(process.communicate(request), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):  # timed out, or the whole sample was
        process.kill()
        await process.wait()
        raise
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError, UnicodeDecodeError):
        return f"error: the tool process failed ({_failure(process.returncode, err)})"
    return answer["result"] if "result" in answer else f"error: {answer['error']}"


def _failure(returncode: int, stderr: bytes) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"  # SIGXCPU: the CPU-time limit
    tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {returncode}"]
    return tail[0][:200]


def _limit(memory_mb: int, cpu_s: int) -> None:
    """Runs in the child before exec: the sandbox's address-space and CPU-time limits."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU at the soft limit
