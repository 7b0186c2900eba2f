"""The rollout manager: the one owner of the rollout side of a run.

Prompts -> engine requests -> `Sample`s -> rewards. Prompt records are turned into token ids
once (chat template applied here, never again); the engine answers `n_samples_per_prompt`
times per prompt through the `RolloutEngine` protocol (any backend); every `Sample` field the
trainer needs is filled here. Seeds are derived from the sampling seed and the prompt's position
in the stream, so the same prompt in the same position gets the same samples in every run.

A training run asks `collect(step)` for a step's scored samples: one batch of
`rollout.batch_size` prompts, or with `algo.dynamic_sampling` (DAPO) rounds of
`over_sampling_batch_size` prompts until `rollout.batch_size` groups with differing rewards are
kept or `max_dynamic_sampling_rounds` ran (the kept groups train; none kept means the step does
not train). With `rollout.partial` a `PartialRollouts` (partial.py) collects the step instead,
streaming groups and carrying the unfinished ones over. Evaluation and `miles rollout` use
`generate_all` on a fixed prompt set.
`SavedRollouts` stands in for the manager when a run trains on saved samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from miles_core.algo import DynamicSamplingTally, keep_groups, round_size
from miles_core.config import AlgoConfig, DataConfig, RewardConfig, RolloutConfig, SamplingConfig
from miles_core.data import render_prompt
from miles_core.data.lengths import check_batch_fits, fit_prompts
from miles_core.engine.protocol import GenerateRequest, Generation, RolloutEngine
from miles_core.errors import MilesError
from miles_core.metrics import rollout_metrics
from miles_core.rewards import compute_rewards, scalar_reward
from miles_core.rl.generate_fn import AgentRollout, agent_metrics, check_group_sizes
from miles_core.sample import Sample, Status, read_samples_jsonl

Progress = Callable[[int], None]


@dataclass
class StepRollout:
    samples: list[Sample]
    """The samples that train: every one generated, or the kept groups under dynamic sampling."""
    generated: list[Sample]
    """Every sample generated (or loaded) this step, for the `rollout/*` metrics."""
    metrics: dict[str, float]
    """`rollout/*` of the generated samples and, under dynamic sampling, `rollout/dynamic_sampling_*`."""


class RolloutSource(Protocol):
    """Where the training loop gets a step's samples: the rollout manager, or saved samples."""

    def collect(self, step: int) -> StepRollout: ...

    def state_dict(self) -> dict:
        """What a checkpoint keeps to continue exactly (JSON-able)."""

    def load_state_dict(self, state: dict) -> None: ...


class StepCollector(Protocol):
    """Collects a training step in the manager's place, with state of its own: partial rollout's
    buffer and streaming step (`partial.PartialRollouts`)."""

    def collect(self, manager: RolloutManager, step: int) -> StepRollout: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class PromptStream:
    """Endless prompt batches for training: the prompt set in a fresh shuffled order each epoch.

    Every drawn prompt gets the next request seed, so a run is reproducible and no two steps
    sample with the same seeds.
    """

    def __init__(self, prompts: Sequence[Sample], prompt_ids: Sequence[list[int]], *, shuffle: bool,
                 seed: int, first_request_seed: int) -> None:
        self.prompts, self.prompt_ids = list(prompts), list(prompt_ids)
        self.shuffle, self._rng = shuffle, random.Random(seed)
        self._order: list[int] = []
        self._next_seed = first_request_seed
        self.epoch = 0
        """Passes over the prompt set started so far."""

    def state_dict(self) -> dict:
        """What continues the stream exactly: the epoch's remaining order, the shuffle RNG, the
        next request seed (JSON-able)."""
        version, internal, gauss = self._rng.getstate()
        return {"order": list(self._order), "rng": [version, list(internal), gauss], "next_seed": self._next_seed,
                "epoch": self.epoch, "position": len(self.prompts) - len(self._order) if self._order else 0}

    def load_state_dict(self, state: dict) -> None:
        if any(not 0 <= i < len(self.prompts) for i in state["order"]):
            raise MilesError(f"the checkpoint's prompt order does not fit the {len(self.prompts)} prompts of this run")
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._order, self._next_seed, self.epoch = list(state["order"]), state["next_seed"], state["epoch"]

    def next_batch(self, size: int) -> tuple[list[Sample], list[list[int]], int]:
        """(prompts, their token ids, the request seed of the first one)."""
        picked = []
        while len(picked) < size:
            if not self._order:
                self._order = list(range(len(self.prompts)))
                self.epoch += 1
                if self.shuffle:
                    self._rng.shuffle(self._order)
            picked.append(self._order.pop(0))
        first_seed, self._next_seed = self._next_seed, self._next_seed + size
        return [self.prompts[i] for i in picked], [self.prompt_ids[i] for i in picked], first_seed


class RolloutManager:
    """Prompts in, scored `Sample` groups out, through any `RolloutEngine`."""

    def __init__(self, engine: RolloutEngine, tokenizer, *, data: DataConfig, sampling: SamplingConfig,
                 reward: RewardConfig, algo: AlgoConfig | None = None, batch_size: int = 0,
                 prompts: Sequence[Sample] = (), partial: StepCollector | None = None,
                 rollout: RolloutConfig | None = None) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.partial = partial
        """The partial-rollout buffer and streaming step (`rollout.partial`), else None."""
        self.data, self.sampling, self.reward, self.algo = data, sampling, reward, algo
        self.agent = AgentRollout.from_config(rollout) if rollout is not None and rollout.agentic else None
        """Generate functions (custom, or multi-turn tool use) instead of one engine call."""
        if self.agent is not None:
            self.data = self.agent.prompt_data(data)
        self.batch_size = batch_size
        """Prompts per training step (`rollout.batch_size`); 0 for a manager that only evaluates."""
        self.stream = self._training_stream(prompts) if prompts else None

    def _training_stream(self, prompts: Sequence[Sample]) -> PromptStream:
        """Every prompt checked against the context (and the batch sizes against the prompt
        count) before the first step, not when a long one is drawn late in a run."""
        prompts, ids = self.fit(prompts)
        sizes = {"rollout.batch_size": self.batch_size}
        if self.algo is not None:
            sizes["algo.over_sampling_batch_size"] = self.algo.over_sampling_batch_size
        check_batch_fits(sizes, prompts, self.data)
        return PromptStream(prompts, ids, shuffle=self.data.shuffle, seed=self.data.seed,
                            first_request_seed=self.sampling.seed)

    def state_dict(self) -> dict:
        """The training stream's state for a checkpoint (empty for a manager that only evaluates),
        and the partial-rollout buffer. Dynamic sampling keeps no groups across steps (surplus kept
        groups are dropped), so these are the whole rollout-side state."""
        state = {"prompt_stream": self.stream.state_dict()} if self.stream is not None else {}
        if self.partial is not None:
            state["partial"] = self.partial.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.stream is not None and "prompt_stream" in state:
            self.stream.load_state_dict(state["prompt_stream"])
        if self.partial is not None and "partial" in state:
            self.partial.load_state_dict(state["partial"])

    # -- generation ------------------------------------------------------------------------
    def render(self, prompts: Sequence[Sample]) -> list[list[int]]:
        return [render_prompt(p.prompt, self.tokenizer, self.data) for p in prompts]

    def fit(self, prompts: Sequence[Sample]) -> tuple[list[Sample], list[list[int]]]:
        """(prompts, token ids) of the prompts that leave room for one generated token in the
        engine's context; a longer one is an error or skipped (`data.on_long_prompt`)."""
        return fit_prompts(prompts, self.render(prompts), self.data, self.engine.max_context_len)

    def generate_all(self, prompts: Sequence[Sample], *, on_progress: Progress | None = None) -> list[list[Sample]]:
        """One group per prompt, in order, request seeds `sampling.seed + position` (the same at
        every call, so two calls differ only by the engine's weights)."""
        return self.generate(prompts, self.render(prompts), first_seed=self.sampling.seed, on_progress=on_progress)

    def generate(self, prompts: Sequence[Sample], prompt_ids: Sequence[list[int]], *, first_seed: int,
                 on_progress: Progress | None = None) -> list[list[Sample]]:
        """One group of `n_samples_per_prompt` samples per prompt, in prompt order."""
        if self.agent is not None:
            return self.agent.generate(self.engine, self.tokenizer, self.data, self.sampling, prompts, prompt_ids,
                                       first_seed=first_seed, on_progress=on_progress)
        requests = [GenerateRequest(input_ids=ids, sampling=self.sampling, seed=first_seed + i, rid=f"prompt-{p.index}")
                    for i, (p, ids) in enumerate(zip(prompts, prompt_ids))]
        outputs = self.engine.generate(requests, on_progress=on_progress)
        groups, index = [], 0
        for group_index, (prompt, ids, generations) in enumerate(zip(prompts, prompt_ids, outputs)):
            group = []
            for generation in generations:
                group.append(_to_sample(prompt, ids, generation, index=index, group_index=group_index))
                index += 1
            groups.append(group)
        return groups

    # -- rewards ---------------------------------------------------------------------------
    def score(self, samples: Sequence[Sample]) -> int:
        """Reward the samples that have none yet; returns how many reward calls failed."""
        return score_unscored(samples, self.reward)

    def raw_rewards(self, samples: Sequence[Sample]) -> list[float]:
        """The task rewards (`reward.key` of dict rewards), before any shaping."""
        return raw_rewards(samples, self.reward)

    # -- a training step -------------------------------------------------------------------
    def collect(self, step: int) -> StepRollout:
        """The step's scored samples: one batch, or dynamic-sampling rounds."""
        if self.stream is None or self.batch_size < 1:
            raise ValueError("collect() needs a manager built with training prompts and a batch size")
        if self.partial is not None:
            return self.partial.collect(self, step)
        if self.algo is not None and self.algo.dynamic_sampling:
            return self._dynamic_sampling(step)
        samples = _numbered(_flatten(self._next_groups(self.batch_size)), self.sampling, step)
        failures = self.score(samples)
        return self._described(samples, samples, {"rollout/reward_failures": float(failures)})

    def _next_groups(self, num_prompts: int) -> list[list[Sample]]:
        batch, ids, first_seed = self.stream.next_batch(num_prompts)
        groups = self.generate(batch, ids, first_seed=first_seed)
        if self.agent is not None:
            check_group_sizes(groups, self.sampling.n_samples_per_prompt)
        return groups

    def _dynamic_sampling(self, step: int) -> StepRollout:
        target, group = self.batch_size, self.sampling.n_samples_per_prompt
        tally, kept, generated, failures = DynamicSamplingTally(), [], [], 0
        while not tally.done(target, self.algo.max_dynamic_sampling_rounds):
            groups = self._next_groups(round_size(self.algo, target))
            samples = _flatten(groups)
            failures += self.score(samples)
            rewards = torch.tensor(self.raw_rewards(samples), dtype=torch.float64)  # float32 sums overflow past 1e38
            keep = keep_groups(self.algo, rewards, group, samples=samples)
            tally = tally.add(keep)
            generated += samples
            kept += [g for g, k in zip(groups, keep.tolist()) if k]
        trained = kept[:target]
        metrics = {
            **tally.metrics(target),
            "rollout/dynamic_sampling_trained_groups": float(len(trained)),
            "rollout/dynamic_sampling_skipped_step": float(not trained),
            "rollout/reward_failures": float(failures),
        }
        return self._described(_numbered(_flatten(trained), self.sampling, step), generated, metrics)

    def _described(self, samples: list[Sample], generated: list[Sample], metrics: dict[str, float]) -> StepRollout:
        described = rollout_metrics(generated, self.raw_rewards(generated), self.sampling.n_samples_per_prompt)
        if self.agent is not None:
            described.update(agent_metrics(generated))
        return StepRollout(samples, generated, {**described, **metrics})


class SavedRollouts:
    """Samples saved by an earlier run (`--debug-train-only`) in place of generation: a fixed
    file, or a template such as `rollouts/step_{rollout_id:06d}.jsonl`."""

    def __init__(self, template: str, sampling: SamplingConfig, reward: RewardConfig) -> None:
        self.template, self.sampling, self.reward = template, sampling, reward

    def state_dict(self) -> dict:
        return {}  # the step number picks the file

    def load_state_dict(self, state: dict) -> None:
        pass

    def collect(self, step: int) -> StepRollout:
        path = Path(rollout_data_path(self.template, step))
        samples = list(read_samples_jsonl(path))
        group = self.sampling.n_samples_per_prompt
        if not samples or len(samples) % group:
            raise MilesError(f"'{path}' holds {len(samples)} samples; expected a non-zero multiple of "
                             f"sampling.n_samples_per_prompt ({group})")
        failures = score_unscored(samples, self.reward)
        rewards = raw_rewards(samples, self.reward)
        metrics = {**rollout_metrics(samples, rewards, group), "rollout/reward_failures": float(failures)}
        return StepRollout(samples, samples, metrics)


def score_unscored(samples: Sequence[Sample], reward: RewardConfig) -> int:
    """Reward the samples that have none yet; returns how many reward calls failed."""
    return compute_rewards([s for s in samples if s.reward is None], reward).num_failed


def raw_rewards(samples: Sequence[Sample], reward: RewardConfig) -> list[float]:
    """The task rewards (`reward.key` of dict rewards), before any shaping."""
    return [scalar_reward(s, reward) for s in samples]


def rollout_data_path(template: str, step: int) -> str:
    """A fixed file, or a template such as `rollouts/step_{rollout_id:06d}.jsonl`."""
    if "{rollout_id" not in template:
        return template
    try:
        return template.format(rollout_id=step)
    except (KeyError, IndexError, ValueError) as err:
        raise MilesError(f"bad rollout data template '{template}': {err!r}; expected e.g. "
                         "'rollouts/step_{rollout_id:06d}.jsonl'") from None


def _to_sample(prompt: Sample, prompt_ids: list[int], gen: Generation, *, index: int, group_index: int) -> Sample:
    status = {"stop": Status.COMPLETED, "length": Status.TRUNCATED}.get(gen.finish_reason["type"], Status.ABORTED)
    return Sample(
        index=index, group_index=group_index, prompt=prompt.prompt,
        tokens=list(prompt_ids) + list(gen.output_ids), response=gen.text,
        response_length=len(gen.output_ids), label=prompt.label,
        loss_mask=[1] * len(gen.output_ids), status=status,
        metadata={**prompt.metadata, "finish_reason": gen.finish_reason},
        rollout_log_probs=list(gen.output_logprobs), rollout_routed_experts=gen.routed_experts,
        weight_versions=[gen.weight_version] * len(gen.output_ids),
    )


def _flatten(groups: list[list[Sample]]) -> list[Sample]:
    return [s for group in groups for s in group]


def _numbered(samples: list[Sample], sampling: SamplingConfig, step: int) -> list[Sample]:
    """Position, group and rollout step of each sample, as trained (groups stay consecutive)."""
    for index, sample in enumerate(samples):
        sample.index, sample.group_index = index, index // sampling.n_samples_per_prompt
        sample.metadata["rollout_id"] = step
    return samples
