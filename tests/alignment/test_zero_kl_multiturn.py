"""Invariant mode, multi-turn: the trainer's log-probs of every model token of a 3-turn
conversation (observations between the turns, masked out) are bitwise equal to the engine's,
though each turn was a new request whose prefix came from the prefix cache or a fresh prefill."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from miles_core.algo.mismatch import MismatchSums
from miles_core.checkpoint.loading import load_model
from miles_core.config import (AlgoConfig, DataConfig, EngineConfig, ModelConfig, RewardConfig, RolloutConfig,
                               SamplingConfig, TrainConfig)
from miles_core.engine.native import NativeEngine
from miles_core.rl.manager import RolloutManager
from miles_core.sample import Sample
from miles_core.train.batch import TrainBatch
from miles_core.train.native import NativeTrainer


@pytest.fixture(autouse=True)
def plugins_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "agent"))


@pytest.mark.parametrize("share_prompt_prefix", [True, False])
def test_multi_turn_log_probs_are_bitwise_equal_in_invariant_mode(tmp_path, monkeypatch, share_prompt_prefix):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path))
    loaded = load_model(ModelConfig(source="tiny-qwen3", device="cpu"), alignment_mode="invariant")
    engine = NativeEngine(loaded.model, loaded.tokenizer, EngineConfig(max_batch_size=5, block_size=16),
                          eos_token_ids=(), max_position_embeddings=512)
    # A third of the byte vocabulary ends a turn, so every turn stops early and the next one follows.
    sampling = SamplingConfig(temperature=0.8, max_new_tokens=12, n_samples_per_prompt=3,
                              stop_token_ids=tuple(range(0, 256, 3)))
    manager = RolloutManager(engine, loaded.tokenizer, data=DataConfig(), sampling=sampling,
                             reward=RewardConfig(type="last_number"),
                             rollout=RolloutConfig(environment="agent_plugins:countdown_env", max_turns=3))
    prompts = [Sample(prompt=f"What is {a} + {b}?", label=str(a + b), index=i) for i, (a, b) in enumerate([(1, 2), (30, 4)])]
    samples = sum(manager.generate_all(prompts), [])
    assert sorted(s.metadata["num_turns"] for s in samples) == [3] * 6
    assert all(s.reward == 3.0 for s in samples)  # the environment's reward after the third step
    masks = [m for s in samples for m in s.loss_mask]
    assert 0 < sum(masks) < len(masks)  # model tokens and observation tokens

    trainer = NativeTrainer(copy.deepcopy(loaded.model), TrainConfig(share_prompt_prefix=share_prompt_prefix),
                            AlgoConfig(), temperature=0.8, total_steps=1)
    batch = TrainBatch.from_samples(samples)
    sums = MismatchSums()
    for trainer_lp, rollout_lp, mask in zip(trainer.compute_log_probs(batch), batch.rollout_log_probs, batch.loss_masks):
        sums.add(trainer_lp, rollout_lp, mask)
    stats = sums.metrics()
    assert stats["num_tokens"] == sum(masks)
    assert stats["bitwise_equal"] == 1.0 and stats["kl_k3"] == 0.0 and stats["max_abs_diff"] == 0.0
