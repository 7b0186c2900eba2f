"""Per-token log-probabilities and entropies when the output layer is split over the vocabulary
(megatron's vocab-parallel output layer under tensor parallelism), in chunks of tokens: the
`kernels/logprobs.py` math with the softmax's reductions completed over the ranks of `group`.

Math: rank r holds rows [v0, v0 + V_r) of the (V, E) output weight W. For hidden h (E,) and
temperature tau its logits are z_r = W_r h / tau (V_r,). Over the group:
- m = max over ranks of max_j z_j (all-reduce MAX);
- s = sum over ranks of sum_j exp(z_j - m), and a = sum over ranks of sum_j exp(z_j - m)(z_j - m)
  (one all-reduce SUM together with the target's logit z_y, which only the rank owning y adds);
- logprob(y) = z_y - (m + log s); entropy H = log s - a / s (= -sum_j p_j log p_j, written around
  m so that no large terms cancel).
Backward (no collective but one): with p_j = exp(z_j - lse) on the rank's own rows,
d logprob / dz = onehot(y) - p and dH / dz = -p (log p + H), as in `kernels/logprobs.py`. The
weight shard's gradient is its own rows' dz^T h. Each rank's dz @ W_r is only its vocabulary
slice's share of dh, so dh is all-reduced (SUM) over the group: the hidden states entered every
rank whole (megatron's `copy_to_tensor_model_parallel_region`), so each rank's backward through
the decoder needs the full gradient.

Memory: (chunk_size, V_r) fp32 logits at a time on each rank; full (T, V) logits never exist.
Every rank calls with the same hidden states and targets (its collectives must meet).

Shape legend: N tokens, E hidden size, V vocab of this rank, C chunk tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from miles_core.kernels import FAST_OPS


def _acc_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _local_logits(h_CE: torch.Tensor, weight_VE: torch.Tensor, temperature: float, ops) -> torch.Tensor:
    logits = ops.linear(h_CE, weight_VE).to(_acc_dtype(h_CE))  # (C, V)
    return logits / torch.full_like(logits[:, :1], temperature)  # as kernels/logprobs.py divides


def _target_columns(targets_C: torch.Tensor, vocab_start: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's column in this rank's slice (0 where another rank owns it) and whether it is ours."""
    local = targets_C - vocab_start
    owned = (local >= 0) & (local < vocab_size)
    return torch.where(owned, local, torch.zeros_like(local)), owned


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NE, weight_VE, targets_N, temperature, chunk_size, group, vocab_start, ops):
        logprobs, entropies, lses = [], [], []
        for start in range(0, hidden_NE.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            z_CV = _local_logits(hidden_NE[sl], weight_VE, temperature, ops)
            m_C = z_CV.max(dim=-1).values
            dist.all_reduce(m_C, op=dist.ReduceOp.MAX, group=group)
            shifted = z_CV - m_C[:, None]
            e_CV = shifted.exp()
            cols, owned = _target_columns(targets_N[sl], vocab_start, weight_VE.shape[0])
            z_target = torch.where(owned, z_CV.gather(-1, cols[:, None]).squeeze(1), torch.zeros_like(m_C))
            stats_3C = torch.stack([e_CV.sum(-1), (e_CV * shifted).sum(-1), z_target])
            dist.all_reduce(stats_3C, group=group)
            s_C, a_C, z_target = stats_3C
            lse_C = m_C + s_C.log()
            logprobs.append(z_target - lse_C)
            entropies.append(s_C.log() - a_C / s_C)
            lses.append(lse_C)
        logp_N, entropy_N = torch.cat(logprobs), torch.cat(entropies)
        ctx.save_for_backward(hidden_NE, weight_VE, targets_N, torch.cat(lses), entropy_N)
        ctx.args = (temperature, chunk_size, group, vocab_start, ops)
        ctx.set_materialize_grads(False)  # an unused output (entropy as a metric) gets None: skip its term
        return logp_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logp_N, grad_entropy_N):
        hidden_NE, weight_VE, targets_N, lse_N, entropy_N = ctx.saved_tensors
        temperature, chunk_size, group, vocab_start, ops = ctx.args
        grad_hidden = torch.zeros_like(hidden_NE) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight_VE, dtype=_acc_dtype(weight_VE)) if ctx.needs_input_grad[1] else None
        inv_t = 1.0 / temperature  # dz/dlogits of z = logits / T, folded into the (N,) grads
        for start in range(0, hidden_NE.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            h_CE = hidden_NE[sl]
            logp_CV = _local_logits(h_CE, weight_VE, temperature, ops) - lse_N[sl, None]
            probs = logp_CV.exp()
            grad_z = torch.zeros_like(probs)
            if grad_entropy_N is not None:
                grad_z -= probs * (logp_CV + entropy_N[sl, None]) * (grad_entropy_N[sl, None] * inv_t)
            if grad_logp_N is not None:
                g_C1 = grad_logp_N[sl, None] * inv_t
                grad_z -= probs * g_C1
                cols, owned = _target_columns(targets_N[sl], vocab_start, weight_VE.shape[0])
                grad_z.scatter_add_(-1, cols[:, None], g_C1 * owned[:, None])
            if grad_hidden is not None:
                grad_hidden[sl] = (grad_z.to(weight_VE.dtype) @ weight_VE).to(hidden_NE.dtype)
            if grad_weight is not None:
                grad_weight += grad_z.T @ h_CE.to(grad_z.dtype)
        if grad_hidden is not None:
            dist.all_reduce(grad_hidden, group=group)  # every vocabulary slice's share of dh
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_VE.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def vocab_parallel_logprobs_entropy(hidden_NE: torch.Tensor, weight_VE: torch.Tensor, targets_N: torch.Tensor,
                                    temperature: float, chunk_size: int, group, vocab_start: int,
                                    ops=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `targets` (global token ids) and entropies, (N,) each, when this rank's
    `weight_VE` is rows [vocab_start, vocab_start + V) of the output weight and the other ranks of
    `group` hold the rest. Every rank gets the same values; differentiable w.r.t. hidden
    (gradient summed over the group) and the weight shard."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _VocabParallelLogprobs.apply(hidden_NE, weight_VE, targets_N, float(temperature), int(chunk_size), group,
                                       int(vocab_start), ops or FAST_OPS)
