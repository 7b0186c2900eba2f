"""The `RolloutEngine` protocol and its request/response records.

The fields mirror SGLang's native `/generate` API (`output_ids`, per-token logprobs,
`finish_reason` as `{"type": "stop", "matched": ...}` or `{"type": "length", "length": N}`,
`weight_version`) so an HTTP client for SGLang or `miles serve` can stand behind the same
protocol as the in-process engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from miles_core.config import SamplingConfig


@dataclass
class GenerateRequest:
    """One prompt, answered `sampling.n_samples_per_prompt` times."""

    input_ids: list[int]
    sampling: SamplingConfig
    seed: int = 0
    """Per-request seed; sample j of the request uses a stream derived from (seed, j)."""
    rid: str = ""


@dataclass
class Generation:
    """One generated response."""

    output_ids: list[int]
    output_logprobs: list[float]
    """Log-probability of each output token under the distribution it was sampled from."""
    finish_reason: dict[str, Any]
    text: str
    prompt_tokens: int
    weight_version: str
    routed_experts: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class RolloutEngine(Protocol):
    """What the rollout manager and the training loop need from an inference engine."""

    @property
    def weight_version(self) -> str: ...

    @property
    def max_context_len(self) -> int:
        """Prompt + response token limit; prompts are checked against it before a run starts."""

    def generate(self, requests: Sequence[GenerateRequest],
                 on_progress: Callable[[int], None] | None = None) -> list[list[Generation]]:
        """Answer every request; returns one list of n generations per request, in order.
        `on_progress(k)` is called as k more sequences finish."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Replace weights (HF names) and stamp a new weight version."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def flush_cache(self) -> None: ...

    def health(self) -> bool: ...

    def release_memory(self, keep_weights: bool = True) -> dict[str, int]:
        """`engine.colocate`: give the GPU memory to the trainer (KV cache, graphs, weights to host,
        or dropped with `keep_weights=False` when a sync rewrites them all after the resume);
        generation is refused until `resume_memory`. Returns the bytes freed by kind (may be empty)."""

    def resume_memory(self) -> None:
        """Take the memory back after `release_memory`, with the same weights (or, dropped, none
        until a sync writes them)."""
