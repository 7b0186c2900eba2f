"""Partial rollout: a step streams its groups, aborts the unfinished ones once it has enough,
and continues them in a later step under the new weights (slime's `--partial-rollout`).

`PartialRollouts` is the buffer of aborted groups and the streaming step that fills and drains
it; the rollout manager hands it `collect(step)` when `rollout.partial` is on. A step submits
the buffered groups first (only their unfinished samples are continued) and fresh prompts up to
`algo.over_sampling_batch_size` groups, then drives the engine one forward at a time. A group
is done when all its samples are; done groups are scored and, under dynamic sampling, filtered.
Once `rollout.batch_size` groups are kept the rest are aborted: their tokens, log-probs and
per-token weight versions go back to the buffer (groups done in the same forward beyond the
batch are dropped, as dynamic sampling drops its surplus). When every group is done and too few
were kept, dynamic sampling submits another round, up to `algo.max_dynamic_sampling_rounds`.

A continuation is one request per unfinished sample: prompt + its response so far as the
prompt, the remaining budget (`sampling.max_new_tokens` minus the response length) as its
limit, and its own sampling seed (from the group's request seed, the sample and the segment).
The engine re-prefills the prefix with the new weights; the new tokens are appended, so token
ids continue where they stopped. A stop string split across the abort point is not matched.
MoE routing is the continuation's (every token's last forward).

Staleness: before a buffered group is continued, its old tokens are excluded from the loss with
`rollout.mask_offpolicy_prefix`; without it, a sample holding a trained token that would lag more
than `loop.max_staleness` versions when this step trains starts over from its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from miles_core.algo import DynamicSamplingTally, keep_groups, round_size
from miles_core.engine.native.outputs import response_text
from miles_core.engine.protocol import GenerateRequest, Generation
from miles_core.errors import MilesError
from miles_core.rl.manager import RolloutManager, StepRollout, _flatten, _numbered, _to_sample
from miles_core.rl.versions import mask_prefix, staleness_metrics, too_stale, train_version
from miles_core.sample import Sample, Status


@dataclass
class _Group:
    """One prompt's samples in flight: each unfinished sample belongs to one engine request."""

    samples: list[Sample | None]
    """None until a fresh group's request answers."""
    prompt: Sample | None = None
    prompt_ids: list[int] = field(default_factory=list)
    requests: list[tuple[object, list[int]]] = field(default_factory=list)
    """(engine handle, positions of the samples it answers)."""

    @property
    def done(self) -> bool:
        return all(handle.done for handle, _ in self.requests)


class PartialRollouts:
    """The partial-rollout buffer, and the streaming step that uses it (module docstring)."""

    def __init__(self, *, mask_offpolicy_prefix: bool, max_staleness: int, steps_per_rollout: int) -> None:
        self.mask_offpolicy_prefix, self.max_staleness = mask_offpolicy_prefix, max_staleness
        self.steps_per_rollout = steps_per_rollout
        self.groups: list[list[Sample]] = []
        """Aborted groups awaiting continuation, oldest first."""

    def state_dict(self) -> dict:
        return {"groups": [[s.to_dict() for s in group] for group in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        self.groups = [[Sample.from_dict(s) for s in group] for group in state["groups"]]

    def collect(self, manager: RolloutManager, step: int) -> StepRollout:
        return _Step(manager, self, step).run()


class _Step:
    """One streaming step of `PartialRollouts.collect`."""

    def __init__(self, manager: RolloutManager, buffer: PartialRollouts, step: int) -> None:
        self.manager, self.buffer, self.step = manager, buffer, step
        self.engine, self.sampling, self.algo = manager.engine, manager.sampling, manager.algo
        self.trained_by = train_version(step, buffer.steps_per_rollout)
        self.pending: list[_Group] = []
        self.kept: list[list[Sample]] = []
        self.generated: list[Sample] = []
        self.counts = {"continued_samples": 0, "restarted_samples": 0, "dropped_groups": 0}
        self.num_rounds = self.num_done = self.failures = self.num_requests = 0

    def run(self) -> StepRollout:
        carried, self.buffer.groups = self.buffer.groups, []
        for samples in carried:
            self._continue(samples)
        self._submit_fresh(max(round_size(self.algo, self.manager.batch_size) - len(carried), 0))
        target = self.manager.batch_size
        while len(self.kept) < target and (self.pending or self._another_round()):
            if not self.engine.step() and not any(g.done for g in self.pending):
                raise MilesError("the engine stopped stepping with requests in flight (is it paused?)")
            self._harvest()
        self._abort_pending()
        return self._result(target)

    # -- submission ------------------------------------------------------------------------
    def _request(self, input_ids: list[int], seed: int, n: int, budget: int) -> object:
        sampling = replace(self.sampling, n_samples_per_prompt=n, max_new_tokens=budget)
        self.num_requests += 1
        rid = f"partial-{self.step}-{self.num_requests}"
        return self.engine.submit(GenerateRequest(list(input_ids), sampling, seed, rid=rid))

    def _submit_fresh(self, num_prompts: int) -> None:
        self.num_rounds += 1
        if num_prompts < 1:
            return
        prompts, ids, first_seed = self.manager.stream.next_batch(num_prompts)
        n = self.sampling.n_samples_per_prompt
        for i, (prompt, prompt_ids) in enumerate(zip(prompts, ids)):
            handle = self._request(prompt_ids, first_seed + i, n, self.sampling.max_new_tokens)
            self.pending.append(_Group([None] * n, prompt, list(prompt_ids), [(handle, list(range(n)))]))

    def _continue(self, samples: list[Sample]) -> None:
        """Resubmit a buffered group's unfinished samples (after masking or restarting stale ones)."""
        group = _Group(list(samples))
        for j, sample in enumerate(samples):
            if self.buffer.mask_offpolicy_prefix:
                mask_prefix(sample)
            elif too_stale(sample, self.trained_by, self.buffer.max_staleness):
                _restart(sample)
                self.counts["restarted_samples"] += 1
            if sample.status in (Status.ABORTED, Status.PENDING):
                budget = self.sampling.max_new_tokens - sample.response_length
                info = sample.metadata["partial"]
                info["segments"] += 1
                seed = continuation_seed(info["seed"], info["sample"], info["segments"])
                group.requests.append((self._request(sample.tokens, seed, 1, budget), [j]))
                self.counts["continued_samples"] += 1
        self.pending.append(group)

    def _another_round(self) -> bool:
        """Dynamic sampling: every group is done and too few were kept: one more round if allowed."""
        if not self.algo.dynamic_sampling or self.num_rounds >= self.algo.max_dynamic_sampling_rounds:
            return False
        self._submit_fresh(round_size(self.algo, self.manager.batch_size))
        return True

    # -- completion ------------------------------------------------------------------------
    def _harvest(self) -> None:
        """Score and filter the groups that finished in the last forward, in submission order."""
        done = [g for g in self.pending if g.done]
        self.pending = [g for g in self.pending if not g.done]
        for group in done:
            samples = self._answered(group)
            self.failures += self.manager.score(samples)
            self.generated += samples
            self.num_done += 1
            if len(self.kept) >= self.manager.batch_size:
                self.counts["dropped_groups"] += 1
            elif self._keep(samples):
                self.kept.append(samples)

    def _keep(self, samples: list[Sample]) -> bool:
        if not self.algo.dynamic_sampling:
            return True
        rewards = torch.tensor(self.manager.raw_rewards(samples), dtype=torch.float64)
        return bool(keep_groups(self.algo, rewards, len(samples), samples=samples)[0])

    def _answered(self, group: _Group) -> list[Sample]:
        """The group's samples with every answered request's tokens in place."""
        samples = group.samples
        for handle, positions in group.requests:
            for j, gen in zip(positions, handle.result()):
                if samples[j] is None:
                    samples[j] = _to_sample(group.prompt, group.prompt_ids, gen, index=0, group_index=0)
                    samples[j].metadata["partial"] = {"seed": handle.request.seed, "sample": j, "segments": 0}
                else:
                    extend(samples[j], gen, self.manager.tokenizer)
        group.requests = []
        return samples

    def _abort_pending(self) -> None:
        """Abort every group still in flight; its samples go back to the buffer."""
        for group in self.pending:
            for handle, _ in group.requests:
                self.engine.abort(handle.request.rid)
        while not all(g.done for g in self.pending):
            self.engine.step()  # drains the aborts: every sequence finishes with its tokens so far
        self.buffer.groups = [self._answered(g) for g in self.pending]
        self.pending = []

    def _result(self, target: int) -> StepRollout:
        trained = self.kept[:target]
        samples = _numbered(_flatten(trained), self.sampling, self.step)
        metrics = {"rollout/reward_failures": float(self.failures),
                   **{f"rollout/partial_{k}": float(v) for k, v in self.counts.items()},
                   "rollout/partial_buffered_groups": float(len(self.buffer.groups)),
                   **staleness_metrics(samples, self.trained_by)}
        if self.algo.dynamic_sampling:
            tally = DynamicSamplingTally(self.num_rounds, self.num_done, len(self.kept))
            metrics.update({**tally.metrics(target), "rollout/dynamic_sampling_trained_groups": float(len(trained)),
                            "rollout/dynamic_sampling_skipped_step": float(not trained)})
        return self.manager._described(samples, self.generated, metrics)


def extend(sample: Sample, gen: Generation, tokenizer) -> None:
    """Append a continuation's tokens, log-probs and versions to `sample` (budget already applied)."""
    new, old_len = list(gen.output_ids), sample.response_length
    sample.tokens = sample.tokens + new
    sample.response_length = old_len + len(new)
    sample.rollout_log_probs = list(sample.rollout_log_probs or []) + list(gen.output_logprobs)
    sample.loss_mask = list(sample.loss_mask if sample.loss_mask is not None else [1] * old_len) + [1] * len(new)
    sample.weight_versions = list(sample.weight_versions) + [gen.weight_version] * len(new)
    sample.rollout_routed_experts = gen.routed_experts
    reason = dict(gen.finish_reason)
    if reason["type"] == "length":
        reason["length"] = sample.response_length
    sample.metadata["finish_reason"] = reason
    sample.status = {"stop": Status.COMPLETED, "length": Status.TRUNCATED}.get(reason["type"], Status.ABORTED)
    sample.response = response_text(tokenizer, sample.response_tokens, reason)


def continuation_seed(seed: int, sample_index: int, segment: int) -> int:
    """Request seed of segment `segment` (1, 2, ...) of sample j of a group first asked with `seed`."""
    return (seed * 1_000_003 + sample_index * 7919 + segment * 104_729 + 1) % (2**62)


def _restart(sample: Sample) -> None:
    """Drop a sample's response: it is generated again from its prompt."""
    sample.tokens = sample.tokens[: sample.prompt_length]
    sample.response_length, sample.response, sample.reward = 0, "", None
    sample.rollout_log_probs, sample.loss_mask, sample.weight_versions = [], [], []
    sample.rollout_routed_experts, sample.status = None, Status.PENDING
