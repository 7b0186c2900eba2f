"""Fused q/k/v and gate/up projections (the engine's fast mode on CUDA): run here on CPU to check
the math; the parameters stay the fused weight's views, so weight updates reach it; invariant
mode never reads it."""

from __future__ import annotations

import copy

import pytest
import torch

from miles_core.engine.native.fuse import fuse_projections
from miles_core.kernels import set_alignment_mode
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
