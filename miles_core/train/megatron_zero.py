"""The megatron trainer's distributed optimizer (`train.use_distributed_optimizer`, slime's
`--use-distributed-optimizer`): ZeRO-1 over the data-parallel replicas (`megatron_data.py`) and
their context-parallel ranks; under pipeline parallelism over those of each stage, which hold
the stage's own parameters (megatron's data-parallel groups lie within a stage).

Each reduction group (`megatron_data.reduction_groups`: the dense parameters over megatron's
data-parallel group with context parallelism, the EP-split experts over its expert-data-parallel
group) flattens its parameters, in model order, into one vector padded to a multiple of the
group size n; rank r of the group owns elements [r*S, (r+1)*S), S = padded length / n, and
keeps them as an fp32 master with its own AdamW moments, so the moments take 1/n of the memory.
A step:
- `reduce_scatter_grads`: the flattened gradients (zeros for a parameter without one) are
  reduce-scattered (summed), so each rank receives its slice of the summed gradient, divided
  by EP as `megatron_data.reduce_grads` does; the model's gradients are then dropped (the
  trainer sums a tied embedding's two pipeline ends before: `megatron_pipeline.reduce_embedding_grads`);
- `grad_norm`: each rank's slices, every element once: the slices partition each group's vector,
  and a parameter replicated over the TP ranks counts on TP rank 0 only, the last stage's copy
  of a tied embedding not at all (`WeightMap.replica_duplicates`, from megatron's replica ids);
  summed over the world, so over every stage's groups;
- the trainer clips the masters' gradients and steps AdamW (`optimizer` here: a plain torch AdamW
  over the masters, so the schedule, clipping and non-finite guard are the usual ones; AdamW is
  elementwise, so the update equals the plain optimizer's);
- after each step, every group all-gathers the updated slices into the parameters.
One difference from the plain optimizer: a parameter without a gradient on every rank is updated
with a zero gradient (its moments decay) instead of being skipped.

Checkpoints keep the plain optimizer's layout (`megatron_checkpoint.py`): `full_optimizer`
all-gathers the moments into a plain AdamW over the model's parameters for a save, `load_full`
takes this rank's slices back out of one loaded, so either optimizer resumes the other's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from miles_core.config import TrainConfig
from miles_core.train.megatron_data import reduction_groups
from miles_core.train.optim import build_optimizer


@dataclass
class _Group:
    """One reduction group's parameters, its process group and this rank's slice of them."""

    params: list[nn.Parameter]
    group: object
    size: int
    start: int
    length: int
    padded: int
    master: nn.Parameter
    counted: torch.Tensor
    """1.0 where this rank's slice counts in the gradient norm (not a TP duplicate)."""

    def slice(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's part of a padded flat vector of the group."""
        return flat[self.start:self.start + self.master.numel()]


class ZeroOptimizer:
    """ZeRO-1 AdamW over `model`'s parameters (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int, ep_size: int,
                 tp_duplicates: set[int]) -> None:
        self.ep_size, self.params = ep_size, [p for p in model.parameters() if p.requires_grad]
        self.groups = [self._group(params, group, lambda p: id(p) not in tp_duplicates)
                       for params, group in reduction_groups(self.params)]
        self.optimizer, self.scheduler = build_optimizer([g.master for g in self.groups], cfg, total_steps)
        self.optimizer.register_step_post_hook(lambda *args: self._gather_params())

    @staticmethod
    def _group(params: list[nn.Parameter], group, not_duplicate) -> _Group:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        length = sum(p.numel() for p in params)
        padded = -(-length // size) * size
        shard = padded // size
        part = slice(rank * shard, (rank + 1) * shard)
        flat = _padded([p.detach() for p in params], padded)
        counted = _padded([torch.full((p.numel(),), float(not_duplicate(p)), device=p.device) for p in params], padded)
        return _Group(params, group, size, rank * shard, length, padded, nn.Parameter(flat[part].clone()),
                      counted[part].clone())

    def reduce_scatter_grads(self) -> None:
        """Each master's gradient: its slice of the summed (and EP-divided) model gradients."""
        for g in self.groups:
            flat = _padded([p.grad if p.grad is not None else torch.zeros_like(p) for p in g.params], g.padded)
            shard = torch.empty_like(g.master)
            if g.size > 1:
                dist.reduce_scatter_tensor(shard, flat, group=g.group)
            else:
                shard.copy_(flat)
            g.master.grad = shard.div_(self.ep_size) if self.ep_size > 1 else shard
            for p in g.params:
                p.grad = None  # ZeRO keeps only the slice

    def grad_norm(self) -> torch.Tensor:
        """The whole model's gradient 2-norm from the masters' slices (the same on every rank)."""
        sum_sq = torch.zeros((), dtype=torch.float32, device=self.groups[0].master.device)
        for g in self.groups:
            sum_sq += (g.master.grad * g.counted).square().sum()
        if dist.get_world_size() > 1:
            dist.all_reduce(sum_sq)
        return sum_sq.sqrt()

    @torch.no_grad()
    def _gather_params(self) -> None:
        """Every rank's updated slices into the model's parameters (after each AdamW step)."""
        for g in self.groups:
            flat = torch.empty(g.padded, dtype=torch.float32, device=g.master.device)
            if g.size > 1:
                dist.all_gather_into_tensor(flat, g.master.detach(), group=g.group)
            else:
                flat.copy_(g.master)
            for p, value in zip(g.params, _unflatten_dense_tensors(flat[:g.length], g.params)):
                p.copy_(value)

    def full_optimizer(self) -> torch.optim.AdamW:
        """A plain AdamW over the model's parameters holding the gathered moments and this
        optimizer's hyperparameters (for a save; a collective)."""
        full = torch.optim.AdamW(self.params)
        full.param_groups[0].update({k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"})
        for g in self.groups:
            state = self.optimizer.state.get(g.master)
            if not state:  # no step yet, on every rank alike
                continue
            moments = [self._gathered(g, state[key]) for key in ("exp_avg", "exp_avg_sq")]
            for p, avg, avg_sq in zip(g.params, *moments):
                full.state[p] = {"step": state["step"].clone(), "exp_avg": avg, "exp_avg_sq": avg_sq}
        return full

    def load_full(self, full: torch.optim.Optimizer) -> None:
        """This rank's slices of the model's (loaded) parameters into the masters, and of a plain
        AdamW's moments (a loaded checkpoint), with its hyperparameters (the scheduled lr)."""
        with torch.no_grad():
            for g in self.groups:
                g.master.copy_(g.slice(_padded([p.detach() for p in g.params], g.padded)))
        for group in self.optimizer.param_groups:
            group.update({k: v for k, v in full.param_groups[0].items() if k not in ("params", "fused", "foreach")})
        on_device = self.optimizer.param_groups[0].get("fused") or self.optimizer.param_groups[0].get("capturable")
        for g in self.groups:
            states = [full.state.get(p, {}) for p in g.params]
            if not all(states):
                continue
            step = torch.tensor(float(states[0]["step"]), dtype=torch.float32,
                                device=g.master.device if on_device else "cpu")
            state = {"step": step}
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = g.slice(_padded([s[key] for s in states], g.padded)).clone()
            self.optimizer.state[g.master] = state

    def _gathered(self, g: _Group, shard: torch.Tensor) -> list[torch.Tensor]:
        flat = torch.empty(g.padded, dtype=shard.dtype, device=shard.device)
        if g.size > 1:
            dist.all_gather_into_tensor(flat, shard.contiguous(), group=g.group)
        else:
            flat.copy_(shard)
        return [t.clone() for t in _unflatten_dense_tensors(flat[:g.length], g.params)]


def _padded(tensors: list[torch.Tensor], padded: int) -> torch.Tensor:
    """`tensors` flattened into one fp32 vector, zero-padded to `padded` elements."""
    flat = torch.zeros(padded, dtype=torch.float32, device=tensors[0].device)
    flat[:sum(t.numel() for t in tensors)] = _flatten_dense_tensors([t.float() for t in tensors])
    return flat
