"""FP8 training GEMMs (`train.precision = "fp8"`): row-wise scaled e4m3 forward, straight-through
backward.

Math. For y = x W^T (+ b) with x (M, K) and W (N, K), each row of x (a token) and each row of W
(an output channel) gets one fp32 scale: s_x[m] = amax(|x[m, :]|) / 448, s_w[n] = amax(|W[n, :]|)
/ 448 (1 for an all-zero row), and x_q = e4m3fn(x / s_x), W_q = e4m3fn(W / s_w) (round to nearest
even). The forward is
    y[m, n] = (x_q[m] . W_q[n]) * s_x[m] * s_w[n]  (+ b[n]),  accumulated in fp32, cast to x's dtype.
This is torch's row-wise `_scaled_mm` recipe (torchao's float8 "rowwise"), which CUDA runs at FP8
rate; on CPU, or when the shapes or dtypes do not suit `_scaled_mm` (K and N multiples of 16,
bf16 output), the same numbers are computed by dequantising both operands and one fp32 matmul
(the emulated path, also what the tests check against hand-computed values).

Backward (straight-through estimator, Bengio et al. 2013): quantisation counts as the identity,
so dL/dx = dL/dy W and dL/dW = dL/dy^T x with the unquantised operands, in the compute dtype. The
backward GEMMs are therefore not FP8 (torchao also quantises them); the forward is where the
train/rollout numerics meet an FP8 engine.

torchao's `Float8Linear` is not used: it is not installed here and swaps modules in ways that
would hide our `Linear` (parameter names, alignment kernels); this module keeps both.

Shape legend: M rows (tokens), K in features, N out features.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.models.layers import Linear
from miles_core.quant.fp8 import FP8_DTYPE, FP8_MAX
from miles_core.quant.formats import DEFAULT_IGNORE


def quantize_rowwise(t_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn values (M, K), fp32 scales (M, 1)): one scale per row, amax / 448."""
    amax_M1 = t_MK.detach().float().abs().amax(-1, keepdim=True)
    scale_M1 = torch.where(amax_M1 > 0, amax_M1 / FP8_MAX, torch.ones_like(amax_M1))
    return (t_MK.detach().float() / scale_M1).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_M1


def fp8_matmul_emulated(x_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """The row-wise FP8 forward computed from dequantised operands in fp32, cast to x's dtype."""
    q_x, s_x = quantize_rowwise(x_MK)
    q_w, s_w = quantize_rowwise(w_NK)
    y = F.linear(q_x.float() * s_x, q_w.float() * s_w, None if bias_N is None else bias_N.float())
    return y.to(x_MK.dtype)


def _scaled_mm_ok(x_MK: torch.Tensor, w_NK: torch.Tensor) -> bool:
    return (x_MK.is_cuda and x_MK.dtype == torch.bfloat16 and hasattr(torch, "_scaled_mm")
            and x_MK.shape[1] % 16 == 0 and w_NK.shape[0] % 16 == 0)


def fp8_matmul(x_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise FP8 forward: torch's `_scaled_mm` on CUDA where it applies, else emulated."""
    if not _scaled_mm_ok(x_MK, w_NK):
        return fp8_matmul_emulated(x_MK, w_NK, bias_N)
    q_x, s_x = quantize_rowwise(x_MK)
    q_w, s_w = quantize_rowwise(w_NK)
    # _scaled_mm wants the second operand column-major: W_q^T of a row-major W_q is.
    y = torch._scaled_mm(q_x.contiguous(), q_w.t(), scale_a=s_x, scale_b=s_w.t(), out_dtype=torch.bfloat16)
    return y if bias_N is None else y + bias_N.to(y.dtype)


class _FP8LinearSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x_MK = x.reshape(-1, x.shape[-1])
        return fp8_matmul(x_MK, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_MN = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = (grad_MN @ weight.to(grad_MN.dtype)).view_as(x)
        grad_w = (grad_MN.t() @ x.reshape(-1, x.shape[-1]).to(grad_MN.dtype)).to(weight.dtype)
        grad_b = grad_MN.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) with the row-wise FP8 forward and the straight-through backward."""
    return _FP8LinearSTE.apply(x, weight, bias)


class FP8TrainLinear(Linear):
    """A `Linear` whose forward matmul runs in row-wise FP8 (parameters unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)


def apply_fp8_training(model: nn.Module, ignore: tuple[str, ...] = DEFAULT_IGNORE) -> list[str]:
    """Swap every plain `Linear` outside `ignore` (output head, embeddings, routers by default;
    QAT modules are no longer plain) to `FP8TrainLinear`; return their names."""
    chosen = [(name, m) for name, m in model.named_modules()
              if type(m) is Linear and not any(fnmatch.fnmatchcase(name, p) for p in ignore)]
    if not chosen:
        raise ValueError("train.precision = 'fp8': the model has no Linear module to run in FP8")
    for _, module in chosen:
        module.__class__ = FP8TrainLinear  # same object and parameters: only the forward changes
    return [name for name, _ in chosen]
