"""Row reductions: RMSNorm and log-softmax, vendor path and batch-invariant path.

Math (RMSNorm, as `transformers`): y = w * (x / sqrt(mean(x^2) + eps)) computed in fp32 and
cast back to the input dtype before the weight multiply. Log-softmax: z - (max + log sum exp(z - max)).

Also softmax and sigmoid, used by MoE routers (a router decides which experts run, so it must
agree between engine and trainer too).

Batch invariance: a vendor reduction may split one long row across threads when there are few
rows (a batch-1 decode step) and not when there are many. The invariant path sums each row
with `cumsum`, a sequential scan along the row: the order of additions is fixed by the row
alone. Max is exact in any order. On CUDA, Triton row kernels with a fixed block are used when
available.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim in a fixed sequential order (keepdim)."""
    return x.cumsum(-1)[..., -1:]


def rms_norm_invariant(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(_row_sum(x.pow(2)) / x.shape[-1] + eps)
    return weight * x.to(dtype)


def log_softmax_reference(z: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z, dim=-1)


def log_softmax_invariant(z: torch.Tensor) -> torch.Tensor:
    peak = z.amax(-1, keepdim=True)
    return z - (peak + _row_sum(torch.exp(z - peak)).log())


def softmax_reference(z: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z, dim=-1)


def softmax_invariant(z: torch.Tensor) -> torch.Tensor:
    return log_softmax_invariant(z).exp()


def sigmoid_invariant(x: torch.Tensor) -> torch.Tensor:
    """Elementwise, but on CPU a vectorised kernel and a scalar tail loop can round differently,
    and which elements land in the tail depends on the tensor's length (i.e. the batch). Padding
    the flat tensor to a multiple of 64 sends every element through the vectorised path."""
    if x.is_cuda:
        return torch.sigmoid(x)
    flat = x.reshape(-1)
    pad = (-flat.numel()) % 64
    return torch.sigmoid(torch.nn.functional.pad(flat, (0, pad)))[: flat.numel()].view(x.shape)
