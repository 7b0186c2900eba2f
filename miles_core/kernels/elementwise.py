"""Elementwise chains of a decoder layer: RMSNorm, rotate-half RoPE, SwiGLU's silu(gate) * up.

Eager PyTorch runs each of them as several kernels (RMSNorm 7, RoPE 5 per tensor, SwiGLU 2), and
a decode step of a small model is bound by how many kernels it launches, not by its math: a
0.6B model's step was about 1,500 kernels of 1-3 us each, even inside a CUDA graph. In `fast` mode
on CUDA, under `torch.inference_mode` (the engine's forwards), these chains run `torch.compile`d
(dynamic shapes), one fused kernel each; the trainer runs them eagerly (compiling them under
autograd is not measured to help; `train.compile` compiles whole layers instead). The fused
kernel computes in fp32 and rounds once at the end, so its bits can differ from eager's
(fast mode promises no bitwise equality). CPU, code already being compiled, or `USE_COMPILED =
False` run the eager references; `invariant` mode runs its own Triton kernels on CUDA
(`rotary_triton`, `swiglu_triton`), the same in the engine and the trainer.

Shape legend: B batch, H heads, T tokens, D head dim.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from miles_core.kernels.norms import rms_norm_reference

USE_COMPILED = True
"""Fast mode on CUDA uses the compiled chains; tests and diagnosis set False."""
log = logging.getLogger("miles")


def rotary_reference(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + rotate_half(x) * sin, cos/sin broadcast over heads."""
    cos, sin = cos_BTD.unsqueeze(1), sin_BTD.unsqueeze(1)
    half = x_BHTD.shape[-1] // 2
    rotated = torch.cat((-x_BHTD[..., half:], x_BHTD[..., :half]), dim=-1)
    return x_BHTD * cos + rotated * sin


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def compiled_on_cuda(fn: Callable) -> Callable:
    """`fn`, compiled on first use with a CUDA tensor; eager elsewhere or once compiling failed."""
    compiled: Callable | None = None
    failed = False

    @functools.wraps(fn)
    def run(x: torch.Tensor, *args):
        nonlocal compiled, failed
        # `is_compiling` first: inside a compiled trainer layer the chain is traced inline, and
        # asking dynamo about inference mode would break the layer's graph at every call.
        if torch.compiler.is_compiling() or failed or not USE_COMPILED or not x.is_cuda \
                or not torch.is_inference_mode_enabled():
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return compiled(x, *args)
        except Exception as err:  # noqa: BLE001 - inductor raises many types; eager is always right
            failed = True
            log.warning("torch.compile of %s failed (%s); running it eagerly", fn.__name__, err)
            return fn(x, *args)

    return run


rms_norm_fast = compiled_on_cuda(rms_norm_reference)
rotary_fast = compiled_on_cuda(rotary_reference)
silu_mul_fast = compiled_on_cuda(silu_mul_reference)
