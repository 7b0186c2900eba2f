"""Optimizer offload (engine.colocate): moving AdamW's state to host memory between rollouts and
back changes no bit of the next update, for the native and the FSDP trainer (DTensor state); a
checkpoint written while offloaded resumes bitwise; on CPU no byte leaves an accelerator."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from miles_core.config import AlgoConfig, ModelConfig, TrainConfig
from miles_core.checkpoint.loading import load_model
from miles_core.train import build_trainer
from miles_core.train.offload import OptimizerOffload
from tests.train.test_trainer_math import _grpo_batch

ALGO = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.1)
TRAIN = dict(lr=1e-3, max_tokens_per_micro_batch=24, num_steps_per_rollout=2)


def _trainer(backend: str, model):
    """A trainer of its own copy of `model` (a trainer takes ownership of the module it is given)."""
    return build_trainer(TrainConfig(backend=backend, **TRAIN), ALGO, copy.deepcopy(model), temperature=1.0,
                         total_steps=4)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in trainer.export_weights()}


def _state_tensors(trainer) -> list[torch.Tensor]:
    return [v for state in trainer.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("backend", ["native", "fsdp"])
def test_offloaded_and_reloaded_state_gives_bitwise_the_same_update(tmp_path, monkeypatch, backend):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    model = load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model
    plain, offloaded = _trainer(backend, model), _trainer(backend, model)
    try:
        for trainer in (plain, offloaded):
            trainer.train_rollout(_grpo_batch())
        kinds = [type(t) for t in _state_tensors(offloaded)]
        assert (DTensor in kinds) == (backend == "fsdp")  # FSDP2 moments are sharded DTensors
        before = [t.clone() if not isinstance(t, DTensor) else t.to_local().clone() for t in _state_tensors(offloaded)]
        pointers = [t.data_ptr() if not isinstance(t, DTensor) else t.to_local().data_ptr()
                    for t in _state_tensors(offloaded)]
        assert offloaded.offload_optimizer() == 0  # CPU: no byte leaves an accelerator
        moved = _state_tensors(offloaded)
        assert all(not isinstance(t, DTensor) for t in moved)  # plain host copies, storage of their own
        assert [t.data_ptr() for t in moved] != pointers and all(torch.equal(a, b) for a, b in zip(moved, before))
        offloaded.reload_optimizer()
        restored = _state_tensors(offloaded)
        assert [type(t) for t in restored] == kinds
        # AdamW: exp_avg and exp_avg_sq of every weight, plus one 0-dim `step` per parameter tensor
        params = list(model.parameters())
        assert sum(t.numel() for t in before) == 2 * sum(p.numel() for p in params) + len(params) == 230_169
        expected, got = plain.train_rollout(_grpo_batch()), offloaded.train_rollout(_grpo_batch())
        assert got == expected
        ours, theirs = _weights(offloaded), _weights(plain)
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_checkpoint_saved_while_offloaded_resumes_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    model = load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model
    trainer = _trainer("native", model)
    trainer.train_rollout(_grpo_batch())
    trainer.offload_optimizer()
    trainer.save(tmp_path / "ckpt")
    assert all(t.device.type == "cpu" for t in _state_tensors(trainer))  # still offloaded after the save
    fresh = _trainer("native", load_model(ModelConfig(source="tiny-qwen3", device="cpu")).model)
    fresh.load(tmp_path / "ckpt")
    assert fresh.train_rollout(_grpo_batch()) == trainer.train_rollout(_grpo_batch())  # reloads by itself
    ours, theirs = _weights(fresh), _weights(trainer)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


@pytest.mark.gpu
def test_gpu_offload_frees_the_state_and_reloads_it_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    model = load_model(ModelConfig(source="tiny-qwen3", device="cuda")).model
    plain, offloaded = _trainer("native", model), _trainer("native", model)
    for trainer in (plain, offloaded):
        trainer.train_rollout(_grpo_batch())
    state_bytes = sum(t.numel() * t.element_size() for t in _state_tensors(offloaded) if t.is_cuda)
    allocated = torch.cuda.memory_allocated()
    assert offloaded.offload_optimizer() == state_bytes > 0
    assert allocated - torch.cuda.memory_allocated() >= 0.9 * state_bytes
    assert all(t.is_pinned() for t in _state_tensors(offloaded))
    offloaded.reload_optimizer()
    assert plain.train_rollout(_grpo_batch()) == offloaded.train_rollout(_grpo_batch())
    ours, theirs = _weights(offloaded), _weights(plain)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


@pytest.mark.gpu
def test_gpu_reload_overlapped_with_the_passes_gives_bitwise_the_same_update(tmp_path, monkeypatch):
    """`train_rollout` reloads an offloaded state on a side stream while its passes run; the
    optimizer step waits for the copies on the GPU. An offload straight after such a reload (no
    step between) waits too and moves the same bits."""
    monkeypatch.setenv("MILES_CACHE", str(tmp_path / "cache"))
    model = load_model(ModelConfig(source="tiny-qwen3", device="cuda")).model
    plain, offloaded = _trainer("native", model), _trainer("native", model)
    for trainer in (plain, offloaded):
        trainer.train_rollout(_grpo_batch())
    before = [t.clone() for t in _state_tensors(offloaded)]
    offloaded.offload_optimizer()
    offload = offloaded._offloads.offloads[0]
    offload.reload(overlap=True)
    assert set(offload._reloading) == {before[0].device}  # queued on the side stream, not waited for
    offloaded.offload_optimizer()
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(_state_tensors(offloaded), before))
    expected, pending = plain.train_rollout(_grpo_batch()), []
    waited = OptimizerOffload.wait_reloaded
    monkeypatch.setattr(OptimizerOffload, "wait_reloaded", lambda self: (pending.append(len(self._reloading)),
                                                                        waited(self)))
    assert offloaded.train_rollout(_grpo_batch()) == expected
    assert pending[0] == 1  # the first optimizer step found the overlapped copies still pending
    ours, theirs = _weights(offloaded), _weights(plain)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)
