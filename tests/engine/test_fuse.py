"""Fused q/k/v and gate/up projections (the engine on CUDA): run here on CPU to check the math; the
parameters stay the fused weight's views, so weight updates reach it; invariant mode reads it only
where its ops say the fused linear gives each block's bits (never on CPU; on GPUs see
tests/kernels/test_linear_tiles.py and the zero-KL tests). The fused weight is the engine's alone:
a copy (the trainer's model) leaves it behind, and a forward with autograd or with cast weights
reads the projections' own."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from miles_core.engine.native.fuse import fuse_projections
from miles_core.kernels import INVARIANT_OPS, set_alignment_mode
from miles_core.quant.modules import dense_copy
from miles_core.train.batch import call_in_dtype
from paged_helpers import model_for


def _logits(model, ids):
    with torch.no_grad():
        return model.lm_head(model(ids, torch.arange(ids.shape[1])[None].expand_as(ids)))


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3-moe"])
def test_fused_projections_compute_the_same_logits(family):
    plain = model_for(family, "fast")
    fused = copy.deepcopy(plain)
    count = fuse_projections(fused)
    assert count >= 2 * plain.args.num_hidden_layers  # every attention, every SwiGLU (experts too)
    ids = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5, atol=1e-5)


def test_weight_updates_reach_the_fused_weight_and_invariant_mode_ignores_it():
    plain = model_for("qwen3", "invariant")
    fused = copy.deepcopy(plain)
    fuse_projections(fused)
    attn = fused.model.layers[0].self_attn
    assert attn.k_proj.weight.data_ptr() == attn.fused_qkv[0][attn.q_proj.weight.shape[0]:].data_ptr()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(fused, ids), _logits(plain, ids))  # invariant: separate projections
    with torch.no_grad():
        for model in (plain, fused):
            model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
            model.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    for model in (plain, fused):
        set_alignment_mode(model, "fast")
    torch.testing.assert_close(_logits(fused, ids), _logits(plain, ids), rtol=1e-5, atol=1e-5)


def test_invariant_mode_reads_the_fused_weights_where_its_ops_agree():
    model = model_for("qwen3", "invariant")
    fuse_projections(model)
    asked, gemms = [], []

    def linear(x, weight, bias=None):
        gemms.append(weight.shape[0])
        return INVARIANT_OPS.linear(x, weight, bias)

    ops = dataclasses.replace(INVARIANT_OPS, linear=linear, fusion_agrees=lambda w, sizes: asked.append(sizes) or True)
    for module in model.modules():
        if hasattr(type(module), "ops"):
            module.ops = ops
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    _logits(model, ids)
    args, layers = model.args, model.args.num_hidden_layers
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    assert asked == [(q, kv, kv), (args.intermediate_size,) * 2] * layers
    assert gemms[:4] == [q + 2 * kv, args.hidden_size, 2 * args.intermediate_size, args.hidden_size]
    assert len(gemms) == 4 * layers + 1  # the lm_head


def _grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.lm_head(model(ids, torch.arange(ids.shape[1])[None].expand_as(ids))).square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen3-moe"])
def test_a_model_the_engine_fused_trains_every_weight_itself_and_in_a_copy(family):
    # The run builds the engine first (which fuses the loaded model on CUDA), then the trainer on a
    # copy: that copy once kept a stale fused tensor and read it, so no q/k/v or gate/up weight
    # got a gradient.
    plain = model_for(family, "fast")
    engine_model = copy.deepcopy(plain)
    fuse_projections(engine_model)
    trainer_model = dense_copy(engine_model)
    assert all(getattr(m, name, None) is None for m in trainer_model.modules() for name in ("fused_qkv", "fused_gate_up"))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    expected = _grads(plain, ids)
    for model in (engine_model, trainer_model):
        grads = _grads(model, ids)
        assert grads.keys() == expected.keys()
        for name, grad in expected.items():
            assert grads[name] is not None, name
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)


def test_a_forward_with_cast_weights_reads_them_not_the_fused_weight():
    plain, engine_model = model_for("qwen3", "fast"), model_for("qwen3", "fast")
    engine_model.load_state_dict(plain.state_dict())
    fuse_projections(engine_model)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    args = (ids, torch.arange(ids.shape[1])[None].expand_as(ids))
    with torch.no_grad():
        got, expected = (call_in_dtype(m, args, torch.bfloat16) for m in (engine_model, plain))
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
