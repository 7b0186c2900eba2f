"""The PPO critic: a value model V(s_t) per response token, trained beside the policy.

Model. A copy of the policy (its transformer trunk; the copied `lm_head` is never used and gets
no gradient) plus `value_head = Linear(hidden, 1)`, zero-initialised so every value starts at 0
and GAE starts out as discounted rewards. The value of response token t is read from the hidden
state that predicts token t, the same position the policy's log-prob of t comes from
(`batch.response_hidden_states` / `shared_prefix_hidden_states`, chosen by
`train.share_prompt_prefix` as for the policy), so values, log-probs and advantages line up.

Training. The critic has its own AdamW and learning-rate schedule with the policy's `TrainConfig`
hyper-parameters (lr, betas, weight decay, warmup, clipping). Old values (V at rollout time,
for GAE and value clipping) come from a no-grad pass before the advantages. During the update
`policy_loss` adds `value_loss_coef * value_loss` to the policy loss; the two models share no
parameters, so one backward gives the policy its policy-gradient and the critic its value
gradient, and each is clipped and stepped by its own optimizer. Value losses use the same global
denominators as the policy loss, so micro-batching does not change them.

Memory: a second full model and optimizer state (double the policy's); fine for small models.
Shape legend: B samples in a micro-batch, R padded response length, N response tokens, E hidden.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from miles_core.config import TrainConfig
from miles_core.checkpoint.loading import DTYPES
from miles_core.train.batch import (
    TrainBatch,
    call_in_dtype,
    pad_ragged,
    response_hidden_states,
    shared_prefix_hidden_states,
)
from miles_core.train.optim import build_optimizer, clip_grad_norm


class ValueModel(nn.Module):
    """Policy trunk copy + zero-initialised `value_head`: per-sample values of the response tokens."""

    def __init__(self, policy: nn.Module, *, share_prompt_prefix: bool) -> None:
        super().__init__()
        self.trunk = copy.deepcopy(policy).train()
        weight = policy.lm_head.weight
        self.value_head = nn.Linear(weight.shape[1], 1, device=weight.device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.hidden_states = shared_prefix_hidden_states if share_prompt_prefix else response_hidden_states

    def forward(self, tokens: Sequence[torch.Tensor], response_lengths: Sequence[int]) -> list[torch.Tensor]:
        hidden_NE, _ = self.hidden_states(self.trunk, tokens, response_lengths)
        values_N = self.value_head(hidden_NE).squeeze(-1).float()
        return list(values_N.split(list(response_lengths)))


class Critic:
    """The value model with its optimizer; the trainer drives it micro-batch by micro-batch."""

    def __init__(self, policy: nn.Module, cfg: TrainConfig, total_steps: int) -> None:
        self.cfg = cfg
        self.model = ValueModel(policy, share_prompt_prefix=cfg.share_prompt_prefix)
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), cfg, total_steps)
        self.device = self.model.value_head.weight.device

    def values(self, batch: TrainBatch, indices: list[int]) -> torch.Tensor:
        """(B, R) values of the samples `indices`, right padded with 0, with grad."""
        args = ([batch.tokens[i] for i in indices], [batch.response_lengths[i] for i in indices])
        return pad_ragged(call_in_dtype(self.model, args, DTYPES[self.cfg.compute_dtype]))

    @torch.no_grad()
    def compute_values(self, batch: TrainBatch, micro_batches: list[list[int]]) -> list[torch.Tensor]:
        """Per-sample values (no grad, on CPU): PPO's old values."""
        out: list[torch.Tensor | None] = [None] * len(batch)
        for indices in micro_batches:
            for i, row in zip(indices, self.values(batch, indices)):
                out[i] = row[: batch.response_lengths[i]].cpu()
        return out

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> float:
        """Clip, step and schedule; returns the value model's gradient norm before clipping."""
        norm = clip_grad_norm(self.model.parameters(), self.cfg)
        self.optimizer.step()
        self.scheduler.step()
        return norm

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
