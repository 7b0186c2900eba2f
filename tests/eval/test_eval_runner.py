"""The eval runner over a scripted engine (no model): what it asks the engine for, how it scores
and aggregates, and when the training loop evaluates."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from miles_core.rl.run import RunComponents
from miles_core.config import ArithmeticConfig, DataConfig, EvalConfig, EvalDatasetConfig, RewardConfig, SamplingConfig, load_config
from miles_core.engine.protocol import Generation
from miles_core.errors import MilesError
from miles_core.rl.eval import evaluate, evaluate_dataset, load_eval_sets


class ScriptedEngine:
    """Answers sample j of every prompt from a script: (right answer?, finish reason, length)."""

    def __init__(self, script):
        self.script, self.requests = script, []

    def generate(self, requests, on_progress=None):
        self.requests.append([(r.seed, r.sampling, r.input_ids) for r in requests])
        out = []
        for request in requests:
            label = int(request.input_ids[-1])  # the fake tokenizer puts the answer last
            gens = []
            for right, reason, length in self.script[: request.sampling.n_samples_per_prompt]:
                text = f"{label if right else label + 1}"
                gens.append(Generation(output_ids=[0] * length, output_logprobs=[-1.0] * length,
                                       finish_reason={"type": reason}, text=text, prompt_tokens=1, weight_version="0"))
            out.append(gens)
            if on_progress:
                on_progress(len(gens))
        return out


class AnswerTokenizer:
    """Plain-text 'tokenizer': the prompt's length, then the sum of its two operands (the label)."""

    def __call__(self, text, add_special_tokens=True):
        a, b = [int(t.strip("?")) for t in text.split() if t.strip("?").isdigit()]
        return {"input_ids": [len(text), a + b]}


DATA = DataConfig(task="arithmetic", apply_chat_template=False, arithmetic=ArithmeticConfig(num_prompts=3, split="test"))
SCRIPT = [(True, "stop", 2), (False, "length", 6), (False, "stop", 4), (True, "stop", 4)]


def dataset(**kw) -> EvalDatasetConfig:
    sampling = SamplingConfig(n_samples_per_prompt=4, seed=100)
    return EvalDatasetConfig(**{"name": "held", "data": DATA, "sampling": sampling,
                                "reward": RewardConfig(type="last_number"), **kw})


def test_evaluate_dataset_scores_and_aggregates():
    [eval_set] = load_eval_sets(EvalConfig(datasets=(dataset(),)))
    engine = ScriptedEngine(SCRIPT)
    metrics, groups = evaluate_dataset(engine, AnswerTokenizer(), eval_set)
    assert [len(g) for g in groups] == [4, 4, 4]
    # Every prompt: samples 0 and 3 right (2 of 4), sample 1 truncated; lengths 2, 6, 4, 4.
    assert metrics == pytest.approx({
        "eval/held/reward": 0.5, "eval/held/accuracy": 0.5,
        "eval/held/pass@1": 0.5,
        "eval/held/pass@2": 5 / 6,   # 1 - C(2,2)/C(4,2) = 1 - 1/6
        "eval/held/pass@4": 1.0,
        "eval/held/mean@4": 0.5,
        "eval/held/response_len": 4.0,  # (2 + 6 + 4 + 4) / 4
        "eval/held/truncated": 0.25,
        "eval/held/reward_failures": 0.0,
    })


def test_requests_use_the_dataset_sampling_and_the_same_seeds_every_time():
    [eval_set] = load_eval_sets(EvalConfig(datasets=(dataset(),)))
    engine = ScriptedEngine(SCRIPT)
    first = evaluate(engine, AnswerTokenizer(), [eval_set])
    second = evaluate(engine, AnswerTokenizer(), [eval_set])
    assert [seed for seed, _, _ in engine.requests[0]] == [100, 101, 102]  # sampling.seed + prompt index
    assert engine.requests[0] == engine.requests[1]
    assert all(sampling == eval_set.cfg.sampling for _, sampling, _ in engine.requests[0])
    assert first.pop("perf/eval_time") >= 0 and second.pop("perf/eval_time") >= 0
    assert first == second


def test_several_datasets_are_prefixed_by_name_and_failures_counted(tmp_path, monkeypatch):
    (tmp_path / "miles_test_flaky_reward.py").write_text(
        "def reward(sample):\n    if sample.response_length == 6:\n        raise RuntimeError('judge down')\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    flaky = dataset(name="flaky", reward=RewardConfig(type="miles_test_flaky_reward:reward"),
                    sampling=SamplingConfig(n_samples_per_prompt=2))
    sets = load_eval_sets(EvalConfig(datasets=(dataset(), flaky)))
    metrics = evaluate(ScriptedEngine(SCRIPT), AnswerTokenizer(), sets)
    assert metrics["eval/held/pass@4"] == 1.0
    assert metrics["eval/flaky/reward_failures"] == 3.0  # sample 1 (length 6) of each of 3 prompts
    assert metrics["eval/flaky/reward"] == pytest.approx(0.5)
    assert "eval/flaky/pass@2" in metrics and "eval/flaky/pass@4" not in metrics


def test_bad_eval_data_names_the_dataset(tmp_path):
    missing = tmp_path / "nope.jsonl"
    bad = dataset(name="file", data=DataConfig(path=str(missing)))
    with pytest.raises(MilesError, match=f"eval dataset 'file': file not found: '{missing}'"):
        load_eval_sets(EvalConfig(datasets=(dataset(), bad)))


# -- when the loop evaluates ---------------------------------------------------------------------------

def eval_steps(num_rollout=6, *, trainer=True, eval_sets=("set",), **eval_kw) -> list[int]:
    cfg = load_config("tiny", [f"loop.num_rollout={num_rollout}"])
    cfg = replace(cfg, eval=replace(cfg.eval, **eval_kw))
    parts = RunComponents(cfg, Path("."), None, engine=object(), trainer=object() if trainer else None,
                          rollouts=None, sync=None, save_all_rollouts=False, eval_sets=list(eval_sets))
    return [step for step in range(num_rollout + 1) if parts.should_eval(step)]


def test_eval_runs_before_training_and_after_the_last_step():
    assert eval_steps() == [0, 6]


def test_eval_interval_adds_evaluations_every_n_steps():
    assert eval_steps(eval_interval=2) == [0, 2, 4, 6]
    assert eval_steps(eval_interval=4) == [0, 4, 6]
    assert eval_steps(eval_interval=1) == [0, 1, 2, 3, 4, 5, 6]


def test_skip_eval_before_train():
    assert eval_steps(eval_interval=4, skip_eval_before_train=True) == [4, 6]


def test_rollout_only_evaluates_the_unchanging_weights_once():
    assert eval_steps(trainer=False, eval_interval=2) == [0]


def test_no_eval_datasets_or_no_engine_means_no_eval():
    assert eval_steps(eval_sets=()) == []
