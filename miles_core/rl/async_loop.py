"""Asynchronous training (`loop.mode = "async"`): the rollout manager generates in a background
thread while the trainer trains, a bounded number of steps ahead.

`AsyncRollouts` stands in for the rollout source and the weight sync of a run. Its producer
thread owns the engine: it generates rollout step r with the weights after step r - lag (lag =
`MilesConfig.rollout_lag`, so every trained token lags at most `loop.max_staleness` versions),
scores it and queues it; the trainer takes step r from the queue. The trainer's weight pushes
are snapshots (copies, the trainer moves on) that the producer applies between rollouts, when no
request is in flight, so no sequence ever mixes weights. The schedule depends on step numbers
only, never on timing: which weights generate which step, and so every token's recorded
version, is the same in every run (bitwise on CPU).

Evaluation runs in the producer too, right after it applies the weights of the step being
evaluated: every eval sees one weight version, recorded as `eval/weight_version`. Each queued
step carries the rollout state after it (prompt stream, partial buffer): a checkpoint after step
s keeps that, so a resumed run redraws the prompts that were in flight (steps s + 1 onwards, the
same prompts and request seeds) and keeps the buffered partial samples; nothing is lost or
trained twice. Only the weights that regenerate them are newer (a resumed run has no older ones).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterable

import torch

from miles_core.rl.manager import RolloutManager, StepRollout
from miles_core.rl.versions import staleness_metrics, train_version, version_after
from miles_core.sync import SyncStats, WeightSync


class AsyncRollouts:
    """`RolloutSource` and `WeightSync` of an async run (module docstring)."""

    def __init__(self, manager: RolloutManager, sync: WeightSync, *, lag: int, steps_per_rollout: int,
                 num_rollout: int, should_eval: Callable[[int], bool],
                 evaluate: Callable[[], dict[str, float]]) -> None:
        self.manager, self.sync, self.lag = manager, sync, lag
        self.steps_per_rollout, self.num_rollout = steps_per_rollout, num_rollout
        self.should_eval, self.evaluate = should_eval, evaluate
        self._cond = threading.Condition()
        self._weights: dict[int, list[tuple[str, torch.Tensor]]] = {}
        """Published weights by the step after which they hold, until the producer applies them."""
        self._ready: dict[int, tuple[StepRollout, dict]] = {}
        self._evals: dict[int, dict[str, float]] = {}
        self._applied = 0
        """The engine holds the weights after this many rollout steps."""
        self._state: dict | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the trainer's side ----------------------------------------------------------------
    def start(self, first_step: int) -> None:
        """Start producing at `first_step`; the engine holds the weights after `first_step` steps."""
        self._applied = first_step
        self._thread = threading.Thread(target=self._produce, args=(first_step,), name="miles-rollout", daemon=True)
        self._thread.start()

    def collect(self, step: int) -> StepRollout:
        """Rollout step `step`, waiting for the producer; adds its staleness metrics."""
        rollout, self._state = self._wait(lambda: self._ready.pop(step, None))
        rollout.metrics.update(staleness_metrics(rollout.samples, train_version(step, self.steps_per_rollout)))
        return rollout

    def push(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncStats:
        """Publish the trainer's weights (a copy) for the producer; before `start`, a plain push."""
        if self._thread is None:
            return self.sync.push(weights, version)
        began = time.perf_counter()
        snapshot = [(name, tensor.detach().clone()) for name, tensor in weights]
        step = int(version) // self.steps_per_rollout
        with self._cond:
            self._weights[step] = snapshot
            self._cond.notify_all()
        size = sum(t.numel() * t.element_size() for _, t in snapshot)
        return SyncStats(len(snapshot), 0, size, time.perf_counter() - began)

    def evaluation(self, step: int) -> dict[str, float]:
        """The eval metrics of the weights after `step` steps (run by the producer)."""
        return self._wait(lambda: self._evals.pop(step, None))

    def state_dict(self) -> dict:
        """The rollout state after the last step taken from the queue (before any: the manager's)."""
        return copy.deepcopy(self._state) if self._state is not None else self.manager.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.manager.load_state_dict(state)

    def close(self) -> None:
        """Stop the producer (it finishes the rollout it is generating) and wait for it."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _wait(self, take: Callable[[], object]) -> object:
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if (got := take()) is not None:
                    return got
                self._cond.wait()

    # -- the producer thread ---------------------------------------------------------------
    def _produce(self, first_step: int) -> None:
        try:
            self._evaluate_due(first_step)
            for step in range(first_step, self.num_rollout):
                if not self._advance_to(max(step - self.lag, first_step)):
                    return
                began = time.perf_counter()
                rollout = self.manager.collect(step)
                rollout.metrics["perf/rollout_generate_time"] = time.perf_counter() - began
                state = copy.deepcopy(self.manager.state_dict())
                with self._cond:
                    self._ready[step] = (rollout, state)
                    self._cond.notify_all()
            self._advance_to(self.num_rollout)  # the last weights, for the final eval
        except BaseException as err:  # handed to the trainer's thread, which raises it
            with self._cond:
                self._error = err
                self._cond.notify_all()

    def _advance_to(self, step: int) -> bool:
        """Apply every published version up to the weights after `step` steps, evaluating each
        one that is due; False when closed meanwhile."""
        while self._applied < step:
            with self._cond:
                while self._applied + 1 not in self._weights and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return False
                weights = self._weights.pop(self._applied + 1)
            self.sync.push(weights, version_after(self._applied, self.steps_per_rollout))
            self._applied += 1
            self._evaluate_due(self._applied)
        return True

    def _evaluate_due(self, step: int) -> None:
        if self.should_eval(step):
            metrics = {**self.evaluate(), "eval/weight_version": float(step * self.steps_per_rollout)}
            with self._cond:
                self._evals[step] = metrics
                self._cond.notify_all()
