"""Partial rollout (rollout.partial): aborted groups are buffered and continue exactly where they
stopped, under the new weights, with the remaining budget; staleness masking and restarts;
dynamic sampling on top; the buffer survives a checkpoint round trip.

The workload: a random tiny model on 8 groups in flight for a batch of 4, where 32 of the 320
token ids stop a response (about 10% a token), up to 32 new tokens: a long tail of lengths, so
every step aborts some groups. Batch-invariant kernels make a continuation comparable bit for
bit with the same request sent alone.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from miles_core.checkpoint.loading import load_model
from miles_core.config import load_config
from miles_core.data import load_prompts
from miles_core.engine import build_engine
from miles_core.engine.protocol import GenerateRequest
from miles_core.rl.manager import RolloutManager
from miles_core.rl.partial import PartialRollouts, continuation_seed
from miles_core.sample import Status

STOPS = list(range(100, 132))
MAX_NEW = 32


def _setup(monkeypatch, tmp_path, *, mask=False, max_staleness=1, extra=()):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    cfg = load_config("tiny", ["rollout.partial=true", "algo.over_sampling_batch_size=8", "algo.use_tis=true",
                               f"sampling.max_new_tokens={MAX_NEW}", f"sampling.stop_token_ids={STOPS}",
                               f"rollout.mask_offpolicy_prefix={str(mask).lower()}", *extra])
    loaded = load_model(cfg.model, alignment_mode="invariant")
    engine = build_engine(cfg.engine, loaded)
    buffer = PartialRollouts(mask_offpolicy_prefix=mask, max_staleness=max_staleness, steps_per_rollout=1)
    manager = RolloutManager(engine, loaded.tokenizer, data=cfg.data, sampling=cfg.sampling, reward=cfg.reward,
                             algo=cfg.algo, batch_size=cfg.rollout.batch_size, prompts=load_prompts(cfg.data),
                             partial=buffer)
    return manager, engine, cfg


def _new_weights(engine, version: str) -> None:
    """A different policy: every weight scaled by 1.05."""
    engine.update_weights([(n, p.detach() * 1.05) for n, p in engine.model.named_parameters()], version=version)


def _seen(rollout, buffer):
    """Every sample of a step: trained, or back in the buffer, by (group seed, sample)."""
    samples = rollout.samples + [s for g in buffer.groups for s in g]
    return {(s.metadata["partial"]["seed"], s.metadata["partial"]["sample"]): s for s in samples}


def test_a_partial_sample_continues_where_it_stopped(monkeypatch, tmp_path):
    manager, engine, cfg = _setup(monkeypatch, tmp_path)
    first = manager.collect(0)
    assert len(first.samples) == 4 * 2 and len(manager.partial.groups) == 4  # 8 in flight, 4 trained
    assert first.metrics["rollout/partial_buffered_groups"] == 4.0
    aborted = {(s.metadata["partial"]["seed"], s.metadata["partial"]["sample"]): copy.deepcopy(s)
               for g in manager.partial.groups for s in g if s.status == Status.ABORTED}
    assert aborted and all(s.metadata["finish_reason"]["type"] == "abort" for s in aborted.values())
    assert any(s.response_length > 0 for s in aborted.values())

    _new_weights(engine, "1")
    second = manager.collect(1)
    continued = 0
    for key, old in aborted.items():
        new = _seen(second, manager.partial)[key]
        grown = new.response_length - old.response_length
        assert new.tokens[: len(old.tokens)] == old.tokens  # token ids continue
        assert new.rollout_log_probs[: old.response_length] == old.rollout_log_probs
        assert new.weight_versions == ["0"] * old.response_length + ["1"] * grown  # one per token
        assert new.response_length <= MAX_NEW  # the budget is the original one
        if new.status == Status.ABORTED:
            continue  # aborted again in step 1: carried once more
        # The continuation is exactly the request "prompt + prefix, remaining budget" sent alone.
        seed = continuation_seed(key[0], key[1], 1)
        sampling = replace(cfg.sampling, n_samples_per_prompt=1, max_new_tokens=MAX_NEW - old.response_length)
        alone = engine.generate([GenerateRequest(old.tokens, sampling, seed)])[0][0]
        assert new.tokens == old.tokens + alone.output_ids
        assert new.rollout_log_probs == old.rollout_log_probs + alone.output_logprobs
        if alone.finish_reason["type"] == "length":  # the length counts the whole response
            assert new.metadata["finish_reason"] == {"type": "length", "length": MAX_NEW}
            assert new.response_length == MAX_NEW
        continued += 1
    assert continued >= 1
    assert second.metrics["rollout/partial_continued_samples"] == float(len(aborted))
    # No mask: trained tokens lag at most one version (the carried prefixes), fresh ones none.
    assert second.metrics["rollout/staleness_max"] == 1.0 and 0 < second.metrics["rollout/staleness_mean"] < 1


def test_mask_offpolicy_prefix_excludes_the_old_tokens(monkeypatch, tmp_path):
    manager, engine, _ = _setup(monkeypatch, tmp_path, mask=True)
    manager.collect(0)
    carried = {(s.metadata["partial"]["seed"], s.metadata["partial"]["sample"]): s.response_length
               for g in manager.partial.groups for s in g}
    _new_weights(engine, "1")
    second = manager.collect(1)
    seen = _seen(second, manager.partial)
    for key, old_len in carried.items():
        new = seen[key]
        assert new.loss_mask == [0] * old_len + [1] * (new.response_length - old_len)
    assert second.metrics["rollout/staleness_max"] == 0.0  # only this step's tokens train


def test_prefixes_past_the_staleness_bound_start_over(monkeypatch, tmp_path):
    manager, engine, _ = _setup(monkeypatch, tmp_path, max_staleness=0)
    manager.collect(0)
    carried = {(s.metadata["partial"]["seed"], s.metadata["partial"]["sample"]) for g in manager.partial.groups
               for s in g if s.response_length > 0}
    _new_weights(engine, "1")
    second = manager.collect(1)
    assert second.metrics["rollout/partial_restarted_samples"] == float(len(carried))
    seen = _seen(second, manager.partial)
    for key in carried:  # regenerated from the prompt: every token is version 1
        assert seen[key].weight_versions == ["1"] * seen[key].response_length
    assert second.metrics["rollout/staleness_max"] == 0.0


def keep_seed_multiple_of_3(rewards, group_size, **inputs):
    """Test filter: keep the groups first asked with a request seed divisible by 3."""
    samples = inputs["samples"]
    seeds = [samples[i].metadata["partial"]["seed"] for i in range(0, len(samples), group_size)]
    return torch.tensor([seed % 3 == 0 for seed in seeds])


def test_dynamic_sampling_filters_streamed_groups(monkeypatch, tmp_path):
    manager, _, _ = _setup(monkeypatch, tmp_path, extra=["algo.dynamic_sampling=true",
                                                         f"algo.dynamic_filter={__name__}:keep_seed_multiple_of_3"])
    rollout = manager.collect(0)
    seeds = [s.metadata["partial"]["seed"] for s in rollout.samples]
    # Round 1 asks seeds 0..7 (kept: 0, 3, 6), all finish, too few: round 2 asks 8..15 (9, 12, 15
    # pass) and the first of those to finish completes the batch; the rest are aborted.
    assert len(rollout.samples) == 8 and all(seed % 3 == 0 for seed in seeds)
    assert sorted(set(seeds))[:3] == [0, 3, 6] and set(seeds) - {0, 3, 6} <= {9, 12, 15}
    assert [s.group_index for s in rollout.samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    m = rollout.metrics
    assert m["rollout/dynamic_sampling_rounds"] == 2.0 and m["rollout/dynamic_sampling_trained_groups"] == 4.0
    assert m["rollout/dynamic_sampling_generated_groups"] - m["rollout/dynamic_sampling_dropped_groups"] == 4.0
    buffered = {s.metadata["partial"]["seed"] for g in manager.partial.groups for s in g}
    assert buffered and buffered <= set(range(8, 16)) and not buffered & set(seeds)


def test_the_buffer_survives_a_checkpoint(monkeypatch, tmp_path):
    """A manager restored from `state_dict` continues the buffered groups like the original."""
    manager, engine, cfg = _setup(monkeypatch, tmp_path)
    manager.collect(0)
    state = copy.deepcopy(manager.state_dict())
    assert len(state["partial"]["groups"]) == 4
    twin = RolloutManager(engine, manager.tokenizer, data=cfg.data, sampling=cfg.sampling, reward=cfg.reward,
                          algo=cfg.algo, batch_size=4, prompts=load_prompts(cfg.data),
                          partial=PartialRollouts(mask_offpolicy_prefix=False, max_staleness=1, steps_per_rollout=1))
    twin.load_state_dict(state)
    _new_weights(engine, "1")
    ours, theirs = manager.collect(1), twin.collect(1)
    assert [s.tokens for s in ours.samples] == [s.tokens for s in theirs.samples]
    assert [s.weight_versions for s in ours.samples] == [s.weight_versions for s in theirs.samples]
    assert manager.state_dict() == twin.state_dict()


def test_a_sync_run_with_partial_rollout_trains_only_fresh_tokens(monkeypatch, tmp_path):
    from miles_core.rl.loop import run_training
    from miles_core.sample import read_samples_jsonl

    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    cfg = load_config("tiny", ["rollout.partial=true", "rollout.mask_offpolicy_prefix=true", "loop.num_rollout=3",
                               "algo.over_sampling_batch_size=8", f"sampling.max_new_tokens={MAX_NEW}",
                               f"sampling.stop_token_ids={STOPS}", "loop.save_rollout_data=true"])
    history = run_training(cfg, tmp_path / "run").history
    assert [r["rollout/staleness_max"] for r in history] == [0.0, 0.0, 0.0]
    assert all(r["rollout/partial_buffered_groups"] > 0 for r in history)
    carried = 0
    for step in range(3):
        for s in read_samples_jsonl(tmp_path / "run" / "rollouts" / f"step_{step:06d}.jsonl"):
            fresh = s.weight_versions.count(str(step))  # sync: step s is generated by version s
            assert s.loss_mask == [0] * (s.response_length - fresh) + [1] * fresh
            carried += fresh < s.response_length
    assert carried > 0
