"""Request-at-a-time use of SGLang-protocol servers: `submit`, `step` and aborts that keep the
tokens so far, the engine surface partial rollout drives (`rl/partial.py`), as the native engine's.

`submit` sends one request in a background thread and returns a handle at once; `step` waits until
some submitted request finishes (or `STEP_WAIT_S` passes) and says whether any is still in flight.
`abort(rid)` asks every server to stop the request: SGLang and `miles serve` then answer it with
`finish_reason = {"type": "abort"}` and the tokens and log-probs generated so far, which the handle
returns as its generations (a plain `generate` call treats such an answer as an error). A request
that had not started on its server comes back with no tokens; one whose abort arrives after it
finished comes back whole. Servers batch concurrent requests themselves (`miles serve`'s batching
window, SGLang's scheduler).
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace

from miles_core.engine.protocol import GenerateRequest, Generation

STEP_WAIT_S = 0.05
"""Longest `step` waits for a submitted request to finish before it returns."""
MAX_SUBMITTED = 1024
"""Requests in flight at once through `submit` (each holds a thread and a connection)."""


def wire_rids(rid: str, n: int) -> list[str]:
    """Every rid a request of `n` samples may carry on the wire (sent whole, or a sample each)."""
    return [rid, *(f"{rid}-{j}" for j in range(n))] if n > 1 else [rid]


@dataclass
class HttpHandle:
    """A submitted request: `done`, then `result()` gives its n generations."""

    request: GenerateRequest
    future: Future

    @property
    def done(self) -> bool:
        return self.future.done()

    def result(self) -> list[Generation]:
        return self.future.result()


class Submissions:
    """Mixin of `SGLangHttpEngine`: needs its `_generate`, `_rids` and `_in_flight`."""

    def submit(self, request: GenerateRequest) -> HttpHandle:
        if not request.rid:
            request = replace(request, rid=f"miles-{next(self._rids)}")
        # Registered before the request leaves: an abort right after submit must name every wire rid.
        self._in_flight[request.rid] = wire_rids(request.rid, request.sampling.n_samples_per_prompt)
        future = self._submit_pool().submit(lambda: self._generate([request], None, keep_aborted=True)[0])
        handle = HttpHandle(request, future)
        with self._submitted_lock:
            self._submitted.append(handle)
        return handle

    def step(self) -> bool:
        """Wait until a submitted request finishes (at most `STEP_WAIT_S`); False when none is in flight."""
        with self._submitted_lock:
            self._submitted = [h for h in self._submitted if not h.done]
            pending = [h.future for h in self._submitted]
        if not pending:
            return False
        wait(pending, timeout=STEP_WAIT_S, return_when=FIRST_COMPLETED)
        return True

    def _submit_pool(self) -> ThreadPoolExecutor:
        with self._submitted_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=MAX_SUBMITTED, thread_name_prefix="sglang-submit")
            return self._pool

    def _init_submissions(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._submitted: list[HttpHandle] = []
        self._submitted_lock = threading.Lock()

    def _close_submissions(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
