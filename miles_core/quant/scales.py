"""The one division every quantisation scale goes through (amax / 448 for FP8, / 7.5 for INT4).

Why not `t / 448.0`: on CUDA torch turns a division by a Python scalar into a product with the
scalar's rounded reciprocal, which is one ulp off the quotient for about half the inputs, while on
CPU it divides. Scales would then differ between a checkpoint quantised on CPU and the same weights
quantised on the GPU at weight sync, and no Triton kernel dividing in IEEE arithmetic could give
the GPU path's bits. Dividing by a 0-dim tensor divides on every device.
"""

from __future__ import annotations

import torch


def divide_rounded(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """`t / divisor` rounded once, in `t`'s dtype (computed in fp32 for half types), on any device."""
    return t / torch.tensor(divisor, dtype=t.dtype, device=t.device)
