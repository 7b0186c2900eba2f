"""The `[rollout.tools]` section: which Python tools a multi-turn rollout may call, and how they run.

Kept apart from `sections.py` (which holds `RolloutConfig` itself) so the agent settings read as
one table. The rollout manager hands it to the tool runner (`miles_core/agent/tools.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from miles_core.config.tree import check as _check


@dataclass(frozen=True, kw_only=True)
class ToolsConfig:
    names: tuple[str, ...] = ()
    """Tools the model may call: built-in names (`calculator`) or `package.module:function` paths.
    Setting any turns on multi-turn tool use (Qwen/Hermes `<tool_call>` JSON format)."""
    timeout_s: float = 10.0
    """Seconds one tool call may take; a slower call becomes an error tool message. 0 waits forever."""
    sandbox: Literal["none", "subprocess"] = "none"
    """`none`: tools run in this process (a worker thread); `subprocess`: each call runs in a fresh
    Python process with `memory_mb` and `cpu_s` limits, killed at the timeout."""
    memory_mb: int = 512
    """`subprocess` sandbox: address-space limit of the tool process, MiB."""
    cpu_s: int = 10
    """`subprocess` sandbox: CPU-time limit of the tool process, seconds."""
    max_calls_per_turn: int = 4
    """Most tool calls run from one model turn; further calls get an error tool message."""

    def __post_init__(self) -> None:
        _check(self.timeout_s >= 0, f"timeout_s must be >= 0 seconds, got {self.timeout_s}")
        _check(self.memory_mb >= 16, f"memory_mb must be >= 16, got {self.memory_mb}")
        _check(self.cpu_s >= 1, f"cpu_s must be >= 1, got {self.cpu_s}")
        _check(self.max_calls_per_turn >= 1, f"max_calls_per_turn must be >= 1, got {self.max_calls_per_turn}")
