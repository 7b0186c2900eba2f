"""INT4 quantisation-aware training: fake quantisation with a straight-through estimator.

Forward. A chosen `Linear` computes with W_fq = dequantize(quantize(W)) (`int4.fake_quantize_int4`,
the very function `miles quantize --format int4` and `sync.quantize = "int4"` apply), so the trainer
sees the weights an INT4 engine holds, bit for bit, when both work in the masters' dtype.

Backward. Rounding has zero gradient almost everywhere; the straight-through estimator (Bengio et
al. 2013, "Estimating or Propagating Gradients Through Stochastic Neurons") passes dL/dW_fq on as
dL/dW unchanged, so the full-precision masters keep learning and the optimizer state stays fp32.
It is a custom autograd function rather than `W + (W_fq - W).detach()`, whose forward value can
differ from W_fq in the last bit.

Modules are swapped in place (`FakeQuantLinear` is a `Linear` whose forward fake-quantises its
weight): parameter names, state dicts and exports do not change, only the forward does.
"""

from __future__ import annotations

import torch
from torch import nn

from miles_core.models.layers import Linear
from miles_core.quant.formats import QuantSpec, is_quantized_weight
from miles_core.quant.int4 import check_group_size, fake_quantize_int4


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, group_size: int) -> torch.Tensor:
        return fake_quantize_int4(weight.detach(), group_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quantize_ste(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """W_fq in the forward, identity gradient in the backward."""
    return _FakeQuantSTE.apply(weight, group_size)


class FakeQuantLinear(Linear):
    """A `Linear` that computes with its weight fake-quantised to group INT4."""

    qat_group_size: int = 128

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, fake_quantize_ste(self.weight, self.qat_group_size), self.bias)


def apply_int4_qat(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Swap every plain `Linear` whose weight `spec` quantises to `FakeQuantLinear`; return their
    names. Subclasses (MoE routers) are left alone. An error when nothing matches or a group
    size does not divide a chosen weight's input features."""
    chosen = []
    for name, module in model.named_modules():
        if type(module) is Linear and is_quantized_weight(f"{name}.weight", tuple(module.weight.shape), spec):
            check_group_size(tuple(module.weight.shape), spec.group_size, name)
            chosen.append((name, module))
    if not chosen:
        raise ValueError(f"train.qat: no Linear module matches {list(spec.include)} (outside {list(spec.ignore)})")
    for _, module in chosen:
        module.__class__ = FakeQuantLinear  # same object, same parameters: only the forward changes
        module.qat_group_size = spec.group_size
    return [name for name, _ in chosen]
