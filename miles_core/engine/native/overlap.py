"""Overlapped decode steps: the next step is planned and launched before this one's tokens are read.

Why: a decode step's host work (staging the graph's inputs, then reading the sampled tokens back,
appending them, checking stops) took about 2 ms at batch 256 on an H200 machine's host, while
the GPU's work was about 4 ms; done one after the other, the GPU idled for the host's share
(`bench/results/rollout_throughput.md`, runs 10-11). With `engine.overlap` the engine plans step
N+1 while step N's tokens are still on the device: every running sequence feeds its pending
token (the graph's token input is filled on the device from step N's sampler output), at the
position after its last, so nothing of N+1's plan needs the token values. Then it reads step N's
tokens, while the GPU runs N+1.

What differs from the plain order: a sequence that step N finishes (a stop token or stop string)
got a row in step N+1; that row's token is dropped unread and the uniform number it drew is never
used again (a finished sequence draws no more). In invariant mode (every row's bits independent
of its batch) the outputs are the plain order's bit for bit; in fast mode that step ran one row
more than the plain order's, and fast kernels round by batch size, so later tokens may differ as
they may after any change of batch (an arrival, a preemption). Steps that cannot be planned
blind fall back to the plain order (`Scheduler.decode_rows_ahead`: prefill next, a length limit
reached, the pool short of blocks), as does any step after requests arrive or are aborted, a
pause, or a weight update. `engine.overlap = "auto"` turns it on for CUDA only: on CPU nothing
runs asynchronously, so there is nothing to overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from miles_core.engine.native.sequence import Sequence


@dataclass
class PendingTokens:
    """A decode step's sampled tokens and log-probs, on their way to the host."""

    seqs: list[Sequence]
    tokens: torch.Tensor
    """(B,) on the device: what the next planned step feeds."""
    logprobs: torch.Tensor
    _host: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _copied: torch.cuda.Event | None = field(default=None, repr=False)

    @classmethod
    def start(cls, seqs: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor) -> PendingTokens:
        """Queue the device-to-host copy (pinned, asynchronous on CUDA) and return at once."""
        pending = cls(seqs, tokens, logprobs)
        if tokens.is_cuda:
            host = (torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True),
                    torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True))
            host[0].copy_(tokens, non_blocking=True)
            host[1].copy_(logprobs, non_blocking=True)
            pending._host, pending._copied = host, torch.cuda.Event()
            pending._copied.record()
        return pending

    def read(self) -> tuple[list[int], list[float]]:
        """The tokens and log-probs as Python numbers (waits for the copy)."""
        if self._copied is None:
            return self.tokens.tolist(), self.logprobs.tolist()
        self._copied.synchronize()
        return self._host[0].tolist(), self._host[1].tolist()
