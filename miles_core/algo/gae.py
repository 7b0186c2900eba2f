"""Discounted returns and GAE as a chunked reverse scan over masked, right-padded rows.

Shape legend: B rows (sequences), T response tokens, C = `chunk_size` positions per chunk.

Math. With per-step rewards r_t and discount d, R_t = r_t + d * R_{t+1} and R = 0 past the end
(responses are terminal). GAE (Schulman et al. 2016, arXiv:1506.02438):
  delta_t = r_t + gamma * V_{t+1} - V_t
  A_t     = delta_t + gamma * lambd * A_{t+1}       (the discounted returns of delta, d = gamma * lambd)
  returns = A + V                                   (targets of the value loss)

Masks. Only tokens with `loss_mask` 1 are steps. Tokens with mask 0, right padding or tool
output inside a multi-turn response, are skipped: they neither receive nor pass on value and
their rewards are ignored, so the step after the last trained token bootstraps from 0. verl's
multi-turn GAE skips observation tokens the same way. Outputs are 0 where the mask is 0.
Deviation: slime discounts over raw positions (a tool-output token counts as a step of the
discount); here only trained tokens count. Both agree without interior masks or with gamma = 1.

Layout. Each row's trained tokens are moved to the front (a stable sort, so order is kept) and
the rest zeroed; the backward recurrence is then a forward scan over the reversed row,
S_j = x_j + d * S_{j-1}, cut into chunks of C positions. Inside every chunk at once, S = x @ M
with the (C, C) matrix M[i, j] = d^(j - i) for j >= i; one loop over the T / C chunks adds the
carry of the previous chunk, S_j += d^(j + 1) * S_prev. Work O(B T C), sequential depth T / C
(slime's `chunked_discounted_returns` scans the same way). The result is scattered back to the
original positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_SIZE = 128


def discounted_returns(rewards: Tensor, discount: float, loss_mask: Tensor | None = None, *,
                       chunk_size: int = CHUNK_SIZE) -> Tensor:
    """(B, T) per-token rewards -> (B, T) discounted returns over the trained tokens of each row."""
    _check_discount("discount", discount)
    if loss_mask is None:
        return _reverse_scan(rewards, discount, chunk_size)
    _check_same_shape(rewards=rewards, loss_mask=loss_mask)
    order, compact_mask = _compaction(loss_mask, rewards.dtype)
    compact = rewards.gather(1, order) * compact_mask  # (B, T), trained tokens first
    return _scatter_back(_reverse_scan(compact, discount, chunk_size) * compact_mask, order)


def gae(token_rewards: Tensor, values: Tensor, loss_mask: Tensor, *, gamma: float, lambd: float,
        chunk_size: int = CHUNK_SIZE) -> tuple[Tensor, Tensor]:
    """(B, T) rewards and values -> (advantages, returns), each (B, T) and 0 where the mask is 0."""
    _check_discount("gamma", gamma)
    _check_discount("lambd", lambd)
    _check_same_shape(token_rewards=token_rewards, values=values, loss_mask=loss_mask)
    order, compact_mask = _compaction(loss_mask, values.dtype)
    rewards_c = token_rewards.gather(1, order) * compact_mask  # (B, T)
    values_c = values.gather(1, order) * compact_mask  # (B, T); 0 past each row's last step
    next_values = torch.nn.functional.pad(values_c[:, 1:], (0, 1))  # V_{t+1}, 0 after the end
    deltas = (rewards_c + gamma * next_values - values_c) * compact_mask
    advantages_c = _reverse_scan(deltas, gamma * lambd, chunk_size) * compact_mask
    advantages = _scatter_back(advantages_c, order)
    return advantages, (advantages + values) * (loss_mask > 0).to(values.dtype)


def _reverse_scan(x: Tensor, discount: float, chunk_size: int) -> Tensor:
    """S_t = x_t + discount * S_{t+1} along dim 1 of a (B, T) tensor, chunked (module docstring)."""
    if x.dim() != 2:
        raise ValueError(f"expected a (B, T) tensor, got shape {tuple(x.shape)}")
    num_rows, length = x.shape
    if length == 0:
        return x.clone()
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    padded = torch.nn.functional.pad(x.flip(1), (0, num_chunks * chunk - length))  # (B, n * C)
    idx = torch.arange(chunk, device=x.device)
    gap = (idx[None, :] - idx[:, None]).to(x.dtype)  # (C, C): j - i
    # d^(j - i) on and above the diagonal; 0 ** 0 == 1 in torch, so discount 0 works too.
    powers = torch.where(gap >= 0, torch.tensor(discount, dtype=x.dtype, device=x.device) ** gap.clamp(min=0), 0)
    local = (padded.view(num_rows, num_chunks, chunk) @ powers)  # (B, n, C): scan inside each chunk
    carry_powers = torch.tensor(discount, dtype=x.dtype, device=x.device) ** torch.arange(
        1, chunk + 1, device=x.device, dtype=x.dtype)  # (C,): d^(j + 1)
    out = torch.empty_like(local)
    carry = x.new_zeros(num_rows, 1)
    for c in range(num_chunks):
        out[:, c] = local[:, c] + carry * carry_powers
        carry = out[:, c, -1:]
    return out.view(num_rows, -1)[:, :length].flip(1)


def _compaction(loss_mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-row permutation putting trained tokens first (stable), and the 0/1 mask in that order."""
    order = torch.sort((loss_mask <= 0).to(torch.int8), dim=1, stable=True).indices  # (B, T)
    return order, (loss_mask.gather(1, order) > 0).to(dtype)


def _scatter_back(compact: Tensor, order: Tensor) -> Tensor:
    return torch.zeros_like(compact).scatter(1, order, compact)


def _check_discount(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"expected (B, T) tensors of one shape, got {shapes}")
