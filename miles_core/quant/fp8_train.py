"""FP8 training GEMMs (`train.precision = "fp8"`): all three GEMMs of a Linear in row-wise scaled
e4m3, with straight-through gradients.

Math. For y = x W^T (+ b) with x (M, K) and W (N, K), each row of x (a token) and each row of W
(an output channel) gets one fp32 scale: s_x[m] = amax(|x[m, :]|) / 448, s_w[n] = amax(|W[n, :]|)
/ 448 (1 for an all-zero row), and x_q = e4m3fn(x / s_x), W_q = e4m3fn(W / s_w) (round to nearest
even). The forward is
    y[m, n] = (x_q[m] . W_q[n]) * s_x[m] * s_w[n]  (+ b[n]),  accumulated in fp32, cast to x's dtype.
This is torch's row-wise `_scaled_mm` recipe (torchao's float8 "rowwise"), which CUDA runs at FP8
rate; on CPU, or when the shapes or dtypes do not suit `_scaled_mm` (K and N multiples of 16,
bf16 output), the same numbers are computed by dequantising both operands and one fp32 matmul
(the emulated path, also what the tests check against hand-computed values).

Backward (straight-through estimator, Bengio et al. 2013): quantisation counts as the identity in
the chain rule, dL/dx = dL/dy W and dL/dW = dL/dy^T x, and each of the two GEMMs runs in FP8 the
same way as the forward, with its operands scaled along its contraction dimension (torchao's
row-wise recipe): dL/dx = fp8(dL/dy) . fp8(W^T) with one scale per token of dL/dy and one per
input feature of W; dL/dW = fp8(dL/dy^T) . fp8(x^T) with one scale per output channel of dL/dy
and per input feature of x, both over the tokens. The tokens are padded with zero rows to a
multiple of 16 for that contraction (`_scaled_mm` needs it; zeros change no sum and no amax).
The bias gradient is the plain sum of dL/dy. On CUDA each `_scaled_mm` operand is quantised by
one Triton kernel (`kernels/fp8_rowwise_triton.py`: rows or columns, padded, no transpose copy)
where a check on the device gives this module's torch bits (`quantize_rows`), else by the torch
functions below.

torchao's `Float8Linear` is not used: it is not installed here and swaps modules in ways that
would hide our `Linear` (parameter names, alignment kernels); this module keeps both.

Shape legend: M rows (tokens), K in features, N out features.
"""

from __future__ import annotations

import fnmatch
import logging

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.models.layers import Linear
from miles_core.quant.fp8 import FP8_DTYPE, FP8_MAX
from miles_core.quant.formats import DEFAULT_IGNORE
from miles_core.quant.scales import divide_rounded

try:
    from miles_core.kernels import fp8_rowwise_triton
except ImportError:  # no Triton: the torch path quantises
    fp8_rowwise_triton = None
_kernel_agrees: dict[tuple, bool] = {}
log = logging.getLogger("miles")


def quantize_rowwise(t_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn values (M, K), fp32 scales (M, 1)): one scale per row, amax / 448."""
    amax_M1 = t_MK.detach().float().abs().amax(-1, keepdim=True)
    scale_M1 = torch.where(amax_M1 > 0, divide_rounded(amax_M1, FP8_MAX), torch.ones_like(amax_M1))
    return (t_MK.detach().float() / scale_M1).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_M1


def quantize_rows(t: torch.Tensor, *, columns: bool = False, pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 (R, P) row-major, fp32 scales (R, 1)) of the rows of 2-D `t` (or of its columns),
    the quantised dimension zero-padded to a multiple of `pad_to`: Triton on CUDA where it gives
    `quantize_rowwise`'s bits, else that function on a transposed, padded copy."""
    if t.is_cuda and _kernel_ok(t):
        return fp8_rowwise_triton.quantize_rows(t, columns=columns, pad_to=pad_to)
    return _quantize_rows_torch(t, columns, pad_to)


def _quantize_rows_torch(t: torch.Tensor, columns: bool, pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = t.t() if columns else t
    pad = -src.shape[1] % pad_to
    return quantize_rowwise((F.pad(src, (0, pad)) if pad else src).contiguous())


def _kernel_ok(t: torch.Tensor) -> bool:
    """Whether the Triton quantiser gives the torch path's bits for `t`'s device and dtype: random
    rows (one all zero) through both, rows and padded columns, in either of its schedules,
    compared bitwise, once."""
    key = (t.device, t.dtype)
    ok = _kernel_agrees.get(key)
    if ok is None:
        ok = False
        if fp8_rowwise_triton is not None:
            gen = torch.Generator(device=t.device).manual_seed(0)
            probe = (torch.randn(70, 300, generator=gen, device=t.device) * 40).to(t.dtype)
            probe[3] = 0
            try:
                ok = all(_same(fp8_rowwise_triton.quantize_rows(probe, columns=c, pad_to=p, split=split),
                               _quantize_rows_torch(probe, c, p))
                         for c, p in ((False, 1), (True, 16)) for split in (False, True))
            except Exception as err:  # noqa: BLE001 - a kernel that does not build here: the torch path is always right
                log.warning("FP8 training: the Triton quantiser failed on %s (%s)", t.device, err)
            if not ok:
                log.warning("FP8 training: the Triton quantiser does not give the torch bits for %s on %s; "
                            "quantising with torch", t.dtype, t.device)
        _kernel_agrees[key] = ok
    return ok


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def fp8_matmul_emulated(x_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """The row-wise FP8 forward computed from dequantised operands in fp32, cast to x's dtype."""
    return _emulated(quantize_rows(x_MK), quantize_rows(w_NK), x_MK.dtype, bias_N)


def _scaled_mm_ok(x_MK: torch.Tensor, w_NK: torch.Tensor) -> bool:
    return _fp8_device(x_MK) and x_MK.shape[1] % 16 == 0 and w_NK.shape[0] % 16 == 0


def _fp8_device(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype == torch.bfloat16 and hasattr(torch, "_scaled_mm")


def fp8_matmul(x_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T with one FP8 scale per row of each operand (every GEMM of `_FP8LinearSTE`): torch's
    `_scaled_mm` on CUDA where it applies, else emulated."""
    return _gemm(quantize_rows(x_MK), quantize_rows(w_NK), _scaled_mm_ok(x_MK, w_NK), x_MK.dtype, bias_N)


Quantized = tuple[torch.Tensor, torch.Tensor]
"""An operand as (e4m3 rows (R, K), fp32 scales (R, 1))."""


def _gemm(a: Quantized, b: Quantized, scaled_mm: bool, dtype: torch.dtype, bias_N: torch.Tensor | None = None
          ) -> torch.Tensor:
    """a_q b_q^T with the operands' scales: `_scaled_mm` (bf16 out) or emulated (`dtype` out)."""
    return _scaled(a, b, bias_N) if scaled_mm else _emulated(a, b, dtype, bias_N)


def _emulated(a: Quantized, b: Quantized, dtype: torch.dtype, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """The same product from dequantised operands in fp32, cast to `dtype`."""
    (q_a, s_a), (q_b, s_b) = a, b
    y = F.linear(q_a.float() * s_a, q_b.float() * s_b, None if bias_N is None else bias_N.float())
    return y.to(dtype)


def _scaled(a: Quantized, b: Quantized, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """a_q b_q^T with the scales of (a_q (M, K), s_a (M, 1)) and (b_q (N, K), s_b (N, 1)), in bf16."""
    (q_a, s_a), (q_b, s_b) = a, b
    # _scaled_mm wants the second operand column-major: b_q^T of a row-major b_q is.
    y = torch._scaled_mm(q_a, q_b.t(), scale_a=s_a, scale_b=s_b.t(), out_dtype=torch.bfloat16)
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
        x_MK = x.reshape(-1, x.shape[-1]).to(grad_MN.dtype)
        # Each GEMM's operands quantised along its contraction (columns where that is the tokens or
        # the weight's output channels), in `_scaled_mm`'s layouts; the tokens padded to 16.
        grad_x = _gemm(quantize_rows(grad_MN), quantize_rows(weight, columns=True),
                       _scaled_mm_ok(grad_MN, weight.t()), grad_MN.dtype)
        grad_w = _gemm(quantize_rows(grad_MN, columns=True, pad_to=16), quantize_rows(x_MK, columns=True, pad_to=16),
                       _fp8_device(grad_MN) and x_MK.shape[1] % 16 == 0, grad_MN.dtype)
        grad_x, grad_w = grad_x.to(x.dtype).view_as(x), grad_w.to(weight.dtype)
        grad_b = grad_MN.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) with row-wise FP8 GEMMs forward and backward (straight-through)."""
    return _FP8LinearSTE.apply(x, weight, bias)


class FP8TrainLinear(Linear):
    """A `Linear` whose matmuls (forward and backward) run in row-wise FP8 (parameters unchanged)."""

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
