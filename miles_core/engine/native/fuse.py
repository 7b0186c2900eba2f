"""Inference-only fusion of the engine model's projections: q/k/v into one GEMM, gate/up into one.

A decode step of a small model is bound by kernel launches and small GEMMs; vLLM and SGLang load
q/k/v and gate/up as one weight each (`QKVParallelLinear`, `MergedColumnParallelLinear`). Here
the checkpoint layout and the HF parameter names stay: the fused weight is allocated once and
each projection's parameter becomes a view of its rows, so `update_weights` (which copies into
the parameters) updates the fused weight too, and no memory is added. `fast` mode reads the fused
weights; `invariant` mode must give the bits of the trainer's separate projections, and reads them
where the invariant linear does so on the device (`Ops.fusion_agrees`, checked once per shape: an
output element's reduction does not depend on its column; an H200 profile of an invariant decode
step at batch 64 showed 7 GEMMs a layer at 8.5 us each against fast mode's 4). Projections that are
not plain `Linear`s (a quantised module) stay apart.
"""

from __future__ import annotations

import torch
from torch import nn

from miles_core.models.layers import Attention, GatedMLP, Linear


def fuses_on(model: nn.Module) -> bool:
    """Whether the engine fuses `model` when it starts: on CUDA, where launches and small GEMMs
    bound a decode step (on CPU the separate GEMMs cost the same; tests force it there)."""
    return model.lm_head.weight.device.type == "cuda"


def fuse_projections(model: nn.Module) -> int:
    """Fuse every attention's q/k/v and every SwiGLU's gate/up; returns how many were fused."""
    fused = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention) and _fusable(module.q_proj, module.k_proj, module.v_proj):
                module.fused_qkv = _fuse([module.q_proj, module.k_proj, module.v_proj])
                fused += 1
            elif isinstance(module, GatedMLP) and _fusable(module.gate_proj, module.up_proj):
                module.fused_gate_up, _ = _fuse([module.gate_proj, module.up_proj])
                fused += 1
    return fused


def _fusable(*linears: nn.Module) -> bool:
    if not all(type(linear) is Linear for linear in linears):
        return False
    weights = [linear.weight for linear in linears]
    same = all(w.dtype == weights[0].dtype and w.device == weights[0].device for w in weights)
    return same and len({linear.bias is None for linear in linears}) == 1


def _fuse(linears: list[Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum of out features, in features) weight (and bias); each linear's become row views."""
    weight = torch.cat([linear.weight for linear in linears])
    bias = torch.cat([linear.bias for linear in linears]) if linears[0].bias is not None else None
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = weight[start : start + rows]
        if bias is not None:
            linear.bias.data = bias[start : start + rows]
        start += rows
    return weight, bias
