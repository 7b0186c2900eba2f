"""AdamW and the learning-rate schedule (linear warmup, then constant or cosine to `min_lr`)."""

from __future__ import annotations

import math

import torch

from miles_core.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    decay_steps = max(total_steps - cfg.lr_warmup_steps, 1)
    progress = min((step - cfg.lr_warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(params, cfg: TrainConfig, total_steps: int, *, fused: bool | None = None):
    """AdamW whose lr follows `lr_at` (a LambdaLR over a base lr of 1): the fused kernel on CUDA
    (one launch for all parameters), the multi-tensor `foreach` path elsewhere (on CPU it gave
    the per-tensor loop's bits in our check, and the recorded runs' metrics are unchanged);
    `fused` overrides the choice."""
    params = list(params)
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW(params, lr=1.0, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, fused=fused or None, foreach=not fused)
    if fused:
        optimizer.register_step_post_hook(_bump_versions)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, total_steps))
    return optimizer, scheduler


def _bump_versions(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """The fused kernel writes the parameters in place without bumping their version counters (the
    foreach path bumps them); what caches tensors made from the parameters keys on those counters
    (`speed.CastCache`: without this, bf16 compute on CUDA kept the first casts after every step)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.autograd.graph.increment_version([getattr(p, "_local_tensor", p) for p in params])


def clip_grad_norm(params, cfg: TrainConfig, norm: torch.Tensor | None = None) -> float:
    """Clip the global gradient norm to `cfg.clip_grad` (0: no clipping); returns the norm before.
    Sharded (FSDP DTensor) gradients: the norm is of the full gradient, reduced over ranks;
    `norm`: the global norm when the caller reduced it itself (tensor-parallel shards)."""
    max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
    params = [p for p in params if p.grad is not None]
    if norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor partial over ranks
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)
