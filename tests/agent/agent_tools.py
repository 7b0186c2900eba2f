"""Tools the agent tests load by dotted path; no heavy imports, so the memory-limited sandbox
process can import them."""

from __future__ import annotations

import threading

RELEASE = threading.Event()
"""Never set by the tests: a tool waiting on it is stuck."""


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def stuck_tool(x: str = "") -> str:
    """Waits for ever (until the test process ends)."""
    RELEASE.wait()
    return "never"


def hog_memory(megabytes: int) -> str:
    """Allocates `megabytes` of memory."""
    return str(len(bytearray(megabytes << 20)))


def spin() -> str:
    """Burns CPU for ever."""
    while True:
        pass
